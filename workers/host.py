"""The model host: loads one model and its tokenizer once per process and keeps them.

Where the engine runs in a process of its own (workers/engine_process.py), that process holds
the ModelHost, and the worker process holds only a TokenizerHost: its threads encode prompts.
"""

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmq.model_copies import local_copy
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
    """A local directory or hub id for from_pretrained; builds the built-in model, or copies an
    object-store model to this host, if needed."""
    if spec.is_object_store:
        return str(local_copy(spec.files, data_dir, spec.storage_options))
    local = spec.local_path(data_dir)
    if spec.is_builtin and local is not None:
        ensure_tiny_model(local)
    return str(local) if local is not None else spec.source


def load_tokenizer(source: str, revision: str | None):
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    forget_split_words(tokenizer)
    return tokenizer


def forget_split_words(tokenizer) -> None:
    """A BPE tokenizer caches up to 10,000 words it has split. Where the pre-tokenizer does not
    split a prompt into words (stories260K's Metaspace), each distinct short prompt is one entry,
    and the cache grew a worker by about 2 KB a job; a worker encodes each prompt once, so the
    cache saves it little."""
    backend = tokenizer.backend_tokenizer
    if hasattr(backend.model, "_resize_cache"):
        backend.model._resize_cache(0)


@dataclass(frozen=True)
class ModelFacts:
    """What the worker's metrics tell about a loaded model (workers.metrics.model_loaded)."""

    dtype: str  # "float32"
    revision: str  # the hub commit of a hub model; "local" for a local folder
    load_seconds: float
    memory_bytes: int = 0  # the weights' (parameters and buffers) on the model's device


@dataclass
class TokenizerHost:
    """The tokenizer alone, for a worker process whose model lives in an engine process."""

    spec: ModelSpec
    device: Device
    tokenizer: object

    @classmethod
    def load(cls, spec: ModelSpec, device: Device, data_dir: Path) -> "TokenizerHost":
        return cls(spec, device, load_tokenizer(resolve_source(spec, data_dir), spec.revision))

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)  # type: ignore[operator]


@dataclass
class ModelHost:
    spec: ModelSpec
    device: Device
    model: PreTrainedModel
    tokenizer: object
    load_seconds: float
    # Torch threads per kind of forward pass ("prefill", "decode", "score"); None: leave torch's
    # setting alone (workers.engine_main.pass_threads says why an engine process sets them).
    pass_threads: dict[str, int] | None = None
    # A prefill or scoring pass of fewer tokens than this runs on the decode pass's threads.
    small_pass_tokens: int = 0

    @classmethod
    def load(cls, spec: ModelSpec, device: Device, data_dir: Path) -> "ModelHost":
        started = time.perf_counter()
        source = resolve_source(spec, data_dir)
        revision = spec.revision  # pins a hub model; a local folder ignores it
        tokenizer = load_tokenizer(source, revision)
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
        forget_split_words(self.tokenizer)  # also for a tokenizer that did not come from load()
        self.ragged_attention = enable_ragged_attention(self.model)
        # 0 where the config does not say: the engine then merges cache groups only at its limit.
        self.hidden_size: int = getattr(self.model.config, "hidden_size", None) or 0
        # Transformers renamed the forward pass's KV cache argument from past_key_values to cache
        # and will drop the old name.
        forward = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"

    def forward(self, kind: str, **inputs):
        """One forward pass of the model; `kind` picks its torch threads (pass_threads), a small
        pass those of a decode pass (small_pass_tokens)."""
        if inputs["input_ids"].numel() < self.small_pass_tokens:
            kind = "decode"
        threads = self.pass_threads.get(kind) if self.pass_threads else None
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return self.model(**inputs)

    def facts(self) -> ModelFacts:
        return ModelFacts(
            dtype=str(self.model.dtype).removeprefix("torch."),
            # The hub commit for a hub model; a local folder has none.
            revision=getattr(self.model.config, "_commit_hash", None) or "local",
            load_seconds=self.load_seconds,
            memory_bytes=sum(
                tensor.numel() * tensor.element_size()
                for tensor in (*self.model.parameters(), *self.model.buffers())
            ),
        )

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)  # type: ignore[operator]

    def decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=True)

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        """One call into the Rust tokenizer for many sequences."""
        return self._backend.decode_batch(sequences, skip_special_tokens=True)
