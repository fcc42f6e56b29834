"""Log-probabilities in OpenAI's shapes, from what a job stores.

A worker stores and streams each token as [token id, logprob, [[id, logprob], ...]] with the
alternatives best first (the prompt's first token as [id, null, null]: nothing predicts it).
The API turns ids into text with the model's tokenizer, here, so the worker's hot loop never
decodes a token it would not otherwise, and a job's stored log-probabilities stay compact.

A token's text is what it adds to the text before it: decoded after an anchor token and cut
after the anchor's own text, so that a SentencePiece word's leading space is kept (decoded
alone, "▁the" loses it). The first token of a decoded text (a prompt's, or a completion's, which
workers decode on its own) is decoded alone, as it was. So concatenated, a choice's token
texts give its text, but where one character spans several byte tokens (those show U+FFFD),
where a stop string cut the text, and for special tokens (shown, though not in the text).
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
        self._alone: dict[int, str] = {}
        self._specials: set[int] | None = None
        self._lock = threading.Lock()

    def text(self, token_id: int, alone: bool = False) -> str:
        """The token's text after others, or `alone` at the start of a text."""
        if alone and not self.special(token_id):
            if (known := self._alone.get(token_id)) is None:
                known = self._alone[token_id] = self.tokenizer.decode([token_id])
            return known
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

    def bytes(self, token_id: int, alone: bool = False) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) or ""
        if match := _BYTE_TOKEN.match(piece):  # a byte-fallback token: its one byte
            return [int(match.group(1), 16)]
        return list(self.text(token_id, alone).encode())

    def texts(self, token_ids: list[int], starts_text: bool) -> list[str]:
        """Each token's text; with `starts_text`, the first that is not special starts a text."""
        texts, alone = [], starts_text
        for token in token_ids:
            texts.append(self.text(token, alone))
            alone = alone and self.special(token)
        return texts

    def after(self, token_ids: list[int]) -> str:
        """The text of tokens that follow others (echo's completion after its prompt)."""
        specials = self._special_set()
        kept = [token for token in token_ids if token not in specials]
        decoded = self.tokenizer.decode([*self._anchor, *kept])
        return decoded[len(self._anchor_text) :]

    def special(self, token_id: int) -> bool:
        return token_id in self._special_set()

    def _special_set(self) -> set[int]:
        if self._specials is None:
            decoder = self.tokenizer.get_added_tokens_decoder()
            self._specials = {i for i, token in decoder.items() if token.special}
        return self._specials


# -- /v1/completions -----------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def text_after_prompt(texts: TokenTexts, done: dict) -> str:
    """A completion's text as it reads after its prompt (echo). Workers decode a completion on
    its own, which drops the leading space a SentencePiece tokenizer's first word carries; its
    token ids, decoded after others, give that space back."""
    text = done["text"]
    entries = (done.get("logprobs") or {}).get("completion") or []
    if not text or not entries:
        return text
    following = texts.after([entry[0] for entry in entries])
    start = following.find(text)
    return following[:start] + text if 0 < start <= 2 and following[:start].isspace() else text


def completion_logprobs(
    texts: TokenTexts, entries: list[Entry], offset: int = 0, starts_text: bool = True
) -> dict:
    """OpenAI's legacy `logprobs` object for consecutive tokens whose text starts at `offset`
    of the choice's text (`starts_text`: they begin a decoded text). Each token's top_logprobs
    holds its alternatives and itself (so up to logprobs + 1 of them), as OpenAI's do."""
    shaped: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    token_texts = texts.texts([entry[0] for entry in entries], starts_text)
    for (token, logprob, alternatives), text in zip(entries, token_texts, strict=True):
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


def chat_logprobs(texts: TokenTexts, entries: list[Entry], starts_text: bool = True) -> dict:
    """OpenAI's chat `logprobs` object: each token with exactly its alternatives."""

    def described(token: int, logprob: float, alone: bool) -> dict:
        text = texts.text(token, alone)
        return {"token": text, "logprob": logprob, "bytes": texts.bytes(token, alone)}

    content, alone = [], starts_text
    for token, logprob, alternatives in entries:
        tops = [described(other, value, alone) for other, value in alternatives]
        content.append(described(token, logprob, alone) | {"top_logprobs": tops})
        alone = alone and texts.special(token)
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
        token_texts = texts.texts([entry[0] for entry in entries], starts_text=True)
        return [
            JobTokenLogprob(
                token_id=token,
                token=text,
                logprob=logprob,
                top_logprobs=None
                if alternatives is None
                else [
                    JobTokenLogprob(token_id=other, token=texts.text(other), logprob=value)
                    for other, value in alternatives
                ],
            )
            for (token, logprob, alternatives), text in zip(entries, token_texts, strict=True)
        ]

    return JobLogprobs(
        prompt=described(stored.get("prompt")), completion=described(stored.get("completion"))
    )
