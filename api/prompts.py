"""Counts prompt tokens with each model's own tokenizer, so over-long prompts fail at submit.

It reads `tokenizer.json` with the `tokenizers` library (the same fast tokenizer Transformers
wraps), which keeps torch out of the API process.
"""

import threading
from pathlib import Path

from tokenizers import Tokenizer

from llmq.errors import PromptTooLong
from llmq.registry import ModelSpec


class PromptCounter:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._tokenizers: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    def tokenizer(self, spec: ModelSpec) -> Tokenizer:
        with self._lock:
            if spec.id not in self._tokenizers:
                self._tokenizers[spec.id] = Tokenizer.from_file(str(self._tokenizer_file(spec)))
            return self._tokenizers[spec.id]

    def _tokenizer_file(self, spec: ModelSpec) -> Path:
        local = spec.local_path(self.data_dir)
        if local is None:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.source, "tokenizer.json"))
        if spec.is_builtin and not (local / "tokenizer.json").exists():
            from llmq.tiny_model import ensure_tiny_model  # first use only

            ensure_tiny_model(local)
        return local / "tokenizer.json"

    def count(self, spec: ModelSpec, prompt: str) -> int:
        return len(self.tokenizer(spec).encode(prompt).ids)

    def check_fits(self, spec: ModelSpec, prompt: str, max_tokens: int) -> int:
        """The prompt's token count; PromptTooLong if prompt plus max_tokens exceed the context."""
        tokens = self.count(spec, prompt)
        if tokens + max_tokens > spec.context_length:
            raise PromptTooLong(tokens, max_tokens, spec.context_length)
        return tokens
