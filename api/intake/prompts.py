"""Each model's tokenizer files, read in the API: prompt token counts (so over-long prompts fail
at submit) and chat templates.

It reads `tokenizer.json` with the `tokenizers` library (the same fast tokenizer Transformers
wraps) and renders chat templates with Jinja as Transformers does, which keeps torch out of the
API process.

Both cost CPU in proportion to the prompt (about a second for a 2 MB prompt), so they never run
on the event loop: callers run them in a worker thread, and prompts are capped in characters
(`check_prompt_size`) before either starts.
"""

import threading
from functools import lru_cache
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from api.schemas.logprobs import TokenTexts
from llmq.errors import InvalidRequest, PromptTooLarge, PromptTooLong, TokenOutOfVocabulary
from llmq.model_files import model_file, special_token_text, tokenizer_config
from llmq.registry import ModelSpec

# For models that ship no chat template (the tiny models, stories260K): one turn per message,
# each ended by the end-of-sequence token, then the assistant's header.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def check_prompt_size(prompt: str, limit: int, param: str = "prompt") -> None:
    """PromptTooLarge (400) if the prompt has more than `limit` characters."""
    if len(prompt) > limit:
        raise PromptTooLarge(len(prompt), limit, param)


@lru_cache
def _compile(template: str):
    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"the model's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class PromptCounter:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._tokenizers: dict[str, Tokenizer] = {}
        self._token_texts: dict[str, TokenTexts] = {}
        self._lock = threading.Lock()

    def token_texts(self, spec: ModelSpec) -> TokenTexts:
        """Token ids to text, for log-probabilities (api/schemas/logprobs.py)."""
        tokenizer = self.tokenizer(spec)
        with self._lock:
            if spec.id not in self._token_texts:
                self._token_texts[spec.id] = TokenTexts(tokenizer)
            return self._token_texts[spec.id]

    def encode(self, spec: ModelSpec, prompt: str) -> list[int]:
        """The prompt's token ids, as the worker encodes it."""
        return list(self.tokenizer(spec).encode_batch_fast([prompt])[0].ids)

    def decode(self, spec: ModelSpec, token_ids: list[int]) -> str:
        return self.tokenizer(spec).decode(token_ids)

    def check_token_ids(self, spec: ModelSpec, named: list[tuple[str, int]]) -> None:
        """InvalidRequest naming the field of the first token id outside the vocabulary."""
        size = self.tokenizer(spec).get_vocab_size(with_added_tokens=True)
        for field, token in named:
            if token >= size:
                raise TokenOutOfVocabulary(
                    f"{field} has token id {token}; {spec.id}'s vocabulary has ids 0 to {size - 1}",
                    param=field,
                )

    def tokenizer(self, spec: ModelSpec) -> Tokenizer:
        with self._lock:
            if spec.id not in self._tokenizers:
                self._tokenizers[spec.id] = Tokenizer.from_file(
                    str(self._model_file(spec, "tokenizer.json"))
                )
            return self._tokenizers[spec.id]

    def _model_file(self, spec: ModelSpec, name: str) -> Path:
        return model_file(spec, self.data_dir, name)

    def _chat_setup(self, spec: ModelSpec) -> tuple[str, dict[str, str]]:
        """The model's chat template (or the default) and its special tokens."""
        config = tokenizer_config(spec, self.data_dir)
        # Beside the config: a hub model's file is only looked for, never downloaded.
        template_file = (
            self._model_file(spec, "tokenizer_config.json").parent / "chat_template.jinja"
        )
        template = config.get("chat_template")
        if template is None and template_file.exists():
            template = template_file.read_text()
        specials = {
            name: special_token_text(config, name) or "" for name in ("bos_token", "eos_token")
        }
        return template or DEFAULT_CHAT_TEMPLATE, specials

    def render_chat(self, spec: ModelSpec, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending with the assistant's turn."""
        template, specials = self._chat_setup(spec)
        return _compile(template).render(messages=messages, add_generation_prompt=True, **specials)

    def eos_text(self, spec: ModelSpec) -> str | None:
        """The end-of-sequence token's text, as the model's tokenizer config names it."""
        return self._chat_setup(spec)[1]["eos_token"] or None

    def count(self, spec: ModelSpec, prompt: str) -> int:
        """The prompt's length in tokens."""
        # The batch call, because the single `encode` holds the GIL all along and so stalls
        # the event loop from a worker thread too; the fast variant skips the offsets.
        return len(self.tokenizer(spec).encode_batch_fast([prompt])[0])

    def check_fits(self, spec: ModelSpec, prompt: str, max_tokens: int) -> int:
        """The prompt's token count; PromptTooLong if prompt plus max_tokens exceed the context."""
        return self.check_count_fits(spec, self.count(spec, prompt), max_tokens)

    def check_count_fits(self, spec: ModelSpec, tokens: int, max_tokens: int) -> int:
        """As check_fits, for a prompt already counted."""
        if tokens + max_tokens > spec.context_length:
            raise PromptTooLong(tokens, max_tokens, spec.context_length)
        return tokens
