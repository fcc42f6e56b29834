"""The upstream model's tokenizer in a remote model's worker: its `tokenizer.json` read with the
`tokenizers` library (the fast tokenizer Transformers wraps, without torch), with the surface
workers/pairs.py uses, so scoring pairs are encoded as lm-evaluation-harness encodes them."""

from pathlib import Path

from tokenizers import Tokenizer

from llmq.model_files import model_file, special_token_text, tokenizer_config
from llmq.registry import ModelSpec


class FilesTokenizer:
    def __init__(self, spec: ModelSpec, data_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_file(spec, data_dir, "tokenizer.json")))
        config = tokenizer_config(spec, data_dir)
        self.bos_token_id = self._id_of(special_token_text(config, "bos_token"))
        self.eos_token_id = self._id_of(special_token_text(config, "eos_token"))

    def _id_of(self, text: str | None) -> int | None:
        return self._tokenizer.token_to_id(text) if text is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | list[int]) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        return self._tokenizer.decode(ids, skip_special_tokens=False)
