"""Log-probabilities in OpenAI's shapes, from what a job stores.

A worker stores and streams each token as [token id, logprob, [[id, logprob], ...]] with the
alternatives best first (the prompt's first token as [id, null, null]: nothing predicts it).
The API turns ids into text with the model's tokenizer, here, so the worker's hot loop never
decodes a token it would not otherwise, and a job's stored log-probabilities stay compact.

A token's text is what it adds to the text before it: decoded after an anchor token and cut
after the anchor's own text, so that a SentencePiece word's leading space is kept (decoded
alone, "▁the" loses it). Concatenated, a job's token texts give its text, but where one
character spans several byte tokens (those show U+FFFD) and where a stop string cut the text.
"""

import re
import threading
from typing import Any

from pydantic import BaseModel, Field
from tokenizers import Tokenizer

Entry = list | tuple  # [token id, logprob | None, [[id, logprob], ...] | None]
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """Each token id's text and bytes for one tokenizer, computed once per id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False).ids
        self._anchor = anchor[-1:] if anchor else []
        self._anchor_text = tokenizer.decode(self._anchor) if self._anchor else ""
        self._texts: dict[int, str] = {}
        self._specials: set[int] | None = None
        self._lock = threading.Lock()

    def text(self, token_id: int) -> str:
        known = self._texts.get(token_id)
        if known is not None:
            return known
        piece = self.tokenizer.id_to_token(token_id)
        if piece is not None and self.special(token_id):
            text = piece  # "</s>": shown, though decoding drops it
        else:
            decoded = self.tokenizer.decode([*self._anchor, token_id])
            text = decoded[len(self._anchor_text) :]
        with self._lock:
            self._texts[token_id] = text
        return text

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) or ""
        if match := _BYTE_TOKEN.match(piece):  # a byte-fallback token: its one byte
            return [int(match.group(1), 16)]
        return list(self.text(token_id).encode())

    def special(self, token_id: int) -> bool:
        if self._specials is None:
            decoder = self.tokenizer.get_added_tokens_decoder()
            self._specials = {i for i, token in decoder.items() if token.special}
        return token_id in self._specials


# -- /v1/completions -----------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def completion_logprobs(texts: TokenTexts, entries: list[Entry], offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object for consecutive tokens whose text starts at `offset`
    of the choice's text. Each token's top_logprobs holds its alternatives and itself (so up
    to logprobs + 1 of them), as OpenAI's do."""
    shaped: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for token, logprob, alternatives in entries:
        text = texts.text(token)
        shaped["tokens"].append(text)
        shaped["token_logprobs"].append(logprob)
        shaped["text_offset"].append(offset)
        offset += 0 if texts.special(token) else len(text)  # "</s>" is not in the text
        if logprob is None:
            shaped["top_logprobs"].append(None)
            continue
        top = {texts.text(other): value for other, value in alternatives}
        top.setdefault(text, logprob)
        shaped["top_logprobs"].append(top)
    return shaped


# -- /v1/chat/completions ------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


def chat_logprobs(texts: TokenTexts, entries: list[Entry]) -> dict:
    """OpenAI's chat `logprobs` object: each token with exactly its alternatives."""

    def described(token: int, logprob: float) -> dict:
        return {"token": texts.text(token), "logprob": logprob, "bytes": texts.bytes(token)}

    content = [
        described(token, logprob)
        | {"top_logprobs": [described(other, value) for other, value in alternatives]}
        for token, logprob, alternatives in entries
    ]
    return {"content": content, "refusal": None}


# -- the job API ---------------------------------------------------------------------------


class JobTokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float | None = Field(description="null for the prompt's first token")
    top_logprobs: list["JobTokenLogprob"] | None = None


class JobLogprobs(BaseModel):
    prompt: list[JobTokenLogprob] | None = Field(
        default=None, description="With prompt_logprobs: each prompt token's"
    )
    completion: list[JobTokenLogprob] | None = Field(
        default=None,
        description="With logprobs: each generated token's, the EOS that ended the text included",
    )


def job_logprobs(texts: TokenTexts, stored: dict) -> JobLogprobs:
    def described(entries: list[Entry] | None) -> list[JobTokenLogprob] | None:
        if entries is None:
            return None
        return [
            JobTokenLogprob(
                token_id=token,
                token=texts.text(token),
                logprob=logprob,
                top_logprobs=None
                if alternatives is None
                else [
                    JobTokenLogprob(token_id=other, token=texts.text(other), logprob=value)
                    for other, value in alternatives
                ],
            )
            for token, logprob, alternatives in entries
        ]

    return JobLogprobs(
        prompt=described(stored.get("prompt")), completion=described(stored.get("completion"))
    )
