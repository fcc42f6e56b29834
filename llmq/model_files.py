"""A model's files (tokenizer, tokenizer config, chat template) read without loading it: from its
folder, the built-in model's (written on first use), the hub's cache, or this host's copy of an
object-store model's tokenizer files. The API reads them to count prompts and render chat
templates; a remote model's worker, to encode scoring pairs."""

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from llmq.errors import ServiceUnavailable
from llmq.model_copies import local_copy
from llmq.registry import ModelSpec

# What is read here of an object-store model: its weights stay in the store.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})


def model_file(spec: ModelSpec, data_dir: Path, name: str) -> Path:
    """The path of one of the model's files (which may not exist, e.g. a chat template)."""
    if spec.is_object_store:
        return _object_store_copy(spec, data_dir) / name
    local = spec.local_path(data_dir)
    if local is None:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec.files, name, revision=spec.revision))
    if spec.is_builtin and not (local / "tokenizer.json").exists():
        # Written on first use by a child process: building the model takes torch, which the
        # API's own process never imports.
        subprocess.run([sys.executable, "-m", "llmq.tiny_model", str(local)], check=True)
    return local / name


def _object_store_copy(spec: ModelSpec, data_dir: Path) -> Path:
    """This host's copy of an object-store model's tokenizer files; ServiceUnavailable (503 in
    the API) naming the URL when the store cannot give them."""
    options = json.dumps(spec.storage_options or {}, sort_keys=True)
    try:
        copy = _tokenizer_copy(spec.files, options, data_dir)
        if not copy.is_dir():  # an old copy removed by hand since
            _tokenizer_copy.cache_clear()
            copy = _tokenizer_copy(spec.files, options, data_dir)
    except Exception as error:  # whatever the store's client raises, after its retries
        raise ServiceUnavailable(
            f"{spec.id}'s tokenizer files cannot be read from {spec.files} now: {error}"
        ) from error
    return copy


@lru_cache
def _tokenizer_copy(url: str, storage_options: str, data_dir: Path) -> Path:
    """Fetched once per process: the tokenizer the API counts with is read once too, and a
    change of weights takes effect at a restart, as for any model."""
    return local_copy(url, data_dir, json.loads(storage_options), TOKENIZER_FILES)


def tokenizer_config(spec: ModelSpec, data_dir: Path) -> dict:
    """The model's tokenizer_config.json ({} when it has none)."""
    config_file = model_file(spec, data_dir, "tokenizer_config.json")
    return json.loads(config_file.read_text()) if config_file.exists() else {}


def special_token_text(config: dict, name: str) -> str | None:
    """The text of a special token (bos_token, eos_token) the config names, plain or saved as
    an AddedToken."""
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None
