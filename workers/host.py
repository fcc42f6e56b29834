"""The model host: loads one model and its tokenizer once per worker process and keeps them."""

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmq.registry import Device, ModelSpec
from llmq.tiny_model import ensure_tiny_model
from workers.ragged import enable_ragged_attention

log = structlog.get_logger(__name__)


def detect_device(requested: str) -> Device:
    """cuda, then mps, then cpu, unless a device was named."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_source(spec: ModelSpec, data_dir: Path) -> str:
    """A local directory or hub id for from_pretrained; builds the built-in model if needed."""
    local = spec.local_path(data_dir)
    if spec.is_builtin and local is not None:
        ensure_tiny_model(local)
    return str(local) if local is not None else spec.source


@dataclass
class ModelHost:
    spec: ModelSpec
    device: Device
    model: PreTrainedModel
    tokenizer: object
    load_seconds: float

    @classmethod
    def load(cls, spec: ModelSpec, device: Device, data_dir: Path) -> "ModelHost":
        started = time.perf_counter()
        source = resolve_source(spec, data_dir)
        revision = spec.revision  # pins a hub model; a local folder ignores it
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", revision=revision)
        model = model.to(device).eval()
        host = cls(spec, device, model, tokenizer, time.perf_counter() - started)
        log.info("model loaded", model=spec.id, device=device, seconds=round(host.load_seconds, 2))
        return host

    def __post_init__(self) -> None:
        # Read once: the tokenizer's attribute lookups are slow enough to show in the decode loop.
        self.eos_token_id: int | None = self.tokenizer.eos_token_id  # type: ignore[attr-defined]
        pad = self.tokenizer.pad_token_id  # type: ignore[attr-defined]
        self.pad_token_id: int = pad if pad is not None else (self.eos_token_id or 0)
        self._backend = self.tokenizer.backend_tokenizer  # type: ignore[attr-defined]
        # A BPE tokenizer caches up to 10,000 words it has split. Where the pre-tokenizer does not
        # split a prompt into words (stories260K's Metaspace), each distinct short prompt is one
        # entry, and the cache grew a worker by about 2 KB a job; a worker encodes each prompt
        # once, so the cache saves it little.
        if hasattr(self._backend.model, "_resize_cache"):
            self._backend.model._resize_cache(0)
        self.ragged_attention = enable_ragged_attention(self.model)
        # Transformers renamed the forward pass's KV cache argument from past_key_values to cache
        # and will drop the old name.
        forward = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)  # type: ignore[operator]

    def decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=True)

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        """One call into the Rust tokenizer for many sequences."""
        return self._backend.decode_batch(sequences, skip_special_tokens=True)
