"""The model registry: which models llmq serves, read from `models.yaml`."""

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmq.object_store import check_url, is_object_store_url, url_scheme
from llmq.pricing import Price, one_currency
from llmq.settings import get_settings

# "remote": the model runs on another OpenAI-compatible server (RemoteUpstream).
Device = Literal["cpu", "cuda", "mps", "remote"]
BUILTIN_PREFIX = "builtin:"
REMOTE_SOURCE = "remote"
# fsspec options that carry credentials (s3fs's, and botocore's in client_kwargs): models.yaml is
# checked in, so they come from the environment or credentials files instead. gcsfs's `token`
# names a method or a file (`anon`, a service account's JSON), not a secret.
SECRET_STORAGE_OPTIONS = frozenset({"key", "secret", "token", "password", "session_token"})
SECRET_CLIENT_KWARGS = frozenset(
    {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
)


class GenerationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)


class CircuitBreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Consecutive failed upstream requests (after their retries) that open the breaker.
    fail_max: int = Field(default=5, ge=1)
    # Seconds the breaker stays open before a probe request may try the upstream again.
    reset_timeout_s: float = Field(default=10.0, gt=0)


class RemoteUpstream(BaseModel):
    """Where a `source: remote` model runs: another OpenAI-compatible server (vLLM, TGI, a
    hosted API, another llmq), reached by the model's remote workers (workers/remote/)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(pattern=r"^https?://", description="the upstream's /v1 URL")
    model: str = Field(min_length=1, description="the model's name upstream")
    # The environment variable holding the upstream's API key, never the key itself: this
    # file is checked in. Unset: no Authorization header.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # Requests in flight to the upstream from all of this model's workers together.
    max_concurrency: int = Field(default=16, ge=1, le=4096)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # The longest silence within a response (between streamed chunks) before it counts as hung.
    read_timeout_s: float = Field(default=60.0, gt=0)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)
    # The upstream echoes prompts with their log-probabilities (`echo` and `logprobs` on
    # completions, as vLLM and llmq do): MMLU runs then score through it.
    prompt_logprobs: bool = False


class ModelSpec(BaseModel):
    """One entry of models.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # A hub id, a local folder, an object-store URL (s3://, gs://: llmq/object_store.py),
    # `builtin:tiny-llama`, or `remote` (see `remote`).
    source: str
    # fsspec options for an object-store URL (endpoint_url, anon, client_kwargs, ...), never
    # credentials; unset: the store's usual places (AWS_* variables, ~/.aws, ...).
    storage_options: dict[str, Any] | None = None
    remote: RemoteUpstream | None = None
    # Where the tokenizer files come from, when not from `source` (a remote model's): the API
    # counts prompts and renders chat templates with them, as for a model served here.
    tokenizer: str | None = None
    # The weights' name for the completion cache (llmq/fingerprint.py): a hub model is loaded at
    # this revision; for a local folder, change it when the weights change. Unset: the cache
    # tells the weights apart by their files.
    revision: str | None = Field(default=None, min_length=1, max_length=100)
    devices: list[Device] = Field(default_factory=lambda: ["cpu"])
    max_batch_size: int = Field(default=16, ge=1)
    max_wait_ms: int = Field(default=5, ge=0)
    context_length: int = Field(default=2048, ge=8)
    max_batch_tokens: int = Field(default=65536, ge=64)
    # A running batch takes newcomers at most every this many decode steps, sooner when they
    # would fill it: each join costs a prefill pass, about a whole step on a CPU.
    join_every_steps: int = Field(default=4, ge=1)
    # Groups the running batch's KV cache may be split into (workers/batch.py): more groups pad
    # less in attention, but each costs one more attention call per layer and decode step.
    max_cache_groups: int = Field(default=4, ge=1)
    # Tokens per scoring turn (and forward pass): the engine runs one turn between decode steps,
    # so this bounds how long a scoring turn holds up other jobs.
    max_score_tokens: int = Field(default=8192, ge=64)
    # continuous: jobs join and leave the running batch at every decode step; static: a
    # micro-batch runs to its end before the next one starts (kept for comparison).
    scheduling: Literal["continuous", "static"] = "continuous"
    # The most of the engine's time background jobs (Batch API lines) get while interactive jobs
    # run; alone, they get all of it.
    background_share: float = Field(default=0.2, gt=0, lt=1)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    # Seconds a job of this model may run before it fails with category timeout (None: the
    # server's job time limit).
    timeout_s: float | None = Field(default=None, gt=0)
    # What its tokens cost (llmq/pricing.py); None: nothing is charged.
    price: Price | None = None

    @model_validator(mode="after")
    def urls_are_object_stores(self) -> "ModelSpec":
        for field in ("source", "tokenizer"):
            value = getattr(self, field)
            if value is not None and url_scheme(value) is not None:
                try:
                    check_url(value)
                except ValueError as error:
                    raise ValueError(f"{self.id}: {field} {error}") from None
        if self.storage_options is not None:
            if not self.is_object_store:
                raise ValueError(f"{self.id}: storage_options is for s3:// and gs:// sources")
            secrets = _credential_options(url_scheme(self.files), self.storage_options)
            if secrets:
                raise ValueError(
                    f"{self.id}: storage_options may not hold credentials ({', '.join(secrets)}): "
                    "set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "GOOGLE_APPLICATION_CREDENTIALS) or the store's credentials files"
                )
        return self

    @model_validator(mode="after")
    def remote_settings_match_source(self) -> "ModelSpec":
        if self.is_remote:
            if self.remote is None:
                raise ValueError(f"{self.id}: source: remote needs a `remote:` block (base_url…)")
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.id}: a remote model needs `tokenizer` (a hub id or folder with the "
                    "upstream model's tokenizer), to count prompts and render chat templates"
                )
            if "devices" not in self.model_fields_set:
                self.devices = ["remote"]
            elif self.devices != ["remote"]:
                raise ValueError(f"{self.id}: a remote model's devices are [remote]")
        else:
            if self.remote is not None:
                raise ValueError(f"{self.id}: a `remote:` block needs source: remote")
            if "remote" in self.devices:
                raise ValueError(f"{self.id}: device remote is for source: remote models")
        return self

    @property
    def is_remote(self) -> bool:
        return self.source == REMOTE_SOURCE

    @property
    def files(self) -> str:
        """Where the model's files come from: its tokenizer's for a remote model, else the
        weights' (which hold the tokenizer too)."""
        return self.tokenizer or self.source

    @property
    def background_window(self) -> int:
        """Batch-API jobs the Batch driver keeps queued or running per live worker: a full
        background batch and half as many ready to join it."""
        return self.max_batch_size + self.max_batch_size // 2

    @property
    def worker_threads(self) -> int:
        """Celery threads per worker: the background window, the interactive batch, and a few
        more, so an interactive job is always picked up at once, however many lines wait. A
        remote model's worker holds as many jobs as may be in flight upstream."""
        if self.remote is not None:
            return self.remote.max_concurrency
        return self.background_window + self.max_batch_size + max(1, self.max_batch_size // 4)

    @property
    def is_builtin(self) -> bool:
        return self.files.startswith(BUILTIN_PREFIX)

    @property
    def is_object_store(self) -> bool:
        """The model's files are in an object store (llmq/object_store.py copies them here)."""
        return is_object_store_url(self.files)

    def local_path(self, data_dir: Path) -> Path | None:
        """Where the model's files lie on disk, or None for a hub id (from_pretrained's) or an
        object-store URL (whose copy's folder depends on the objects: llmq/object_store.py)."""
        if self.is_object_store:
            return None
        if self.is_builtin:
            return data_dir / "models" / self.files.removeprefix(BUILTIN_PREFIX)
        path = Path(self.files)
        return path if path.is_dir() else None

    def queue(self, device: Device) -> str:
        return f"llmq.{self.id}.{device}"


def queue_model(queue: str) -> str | None:
    """The model id of a queue named by ModelSpec.queue; None for any other name."""
    if not queue.startswith("llmq.") or queue.count(".") < 2:
        return None
    return queue.removeprefix("llmq.").rsplit(".", 1)[0]


class Registry(BaseModel):
    models: list[ModelSpec]

    @model_validator(mode="after")
    def prices_share_a_currency(self) -> "Registry":
        one_currency((spec.id, spec.price) for spec in self.models)  # ValueError if they differ
        return self

    @property
    def currency(self) -> str | None:
        """The currency the priced models share; None when none has a price."""
        return one_currency((spec.id, spec.price) for spec in self.models)

    def get(self, model_id: str) -> ModelSpec | None:
        return next((m for m in self.models if m.id == model_id), None)

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]


def _credential_options(scheme: str | None, options: dict[str, Any]) -> list[str]:
    """The names of the credentials among an object store's fsspec options."""
    secret = SECRET_STORAGE_OPTIONS - {"token"} if scheme == "gs" else SECRET_STORAGE_OPTIONS
    found = sorted(secret & options.keys())
    client_kwargs = options.get("client_kwargs")
    if isinstance(client_kwargs, dict):
        found += sorted(
            f"client_kwargs.{name}" for name in SECRET_CLIENT_KWARGS & client_kwargs.keys()
        )
    return found


def load_registry(path: Path) -> Registry:
    raw = yaml.safe_load(path.read_text()) or {}
    registry = Registry.model_validate(raw)
    for spec in registry.models:
        spec.source = _resolved(spec.source, path.parent)
        if spec.tokenizer is not None:
            spec.tokenizer = _resolved(spec.tokenizer, path.parent)
    return registry


def _resolved(source: str, base: Path) -> str:
    """A folder named relative to models.yaml, made absolute; other sources as they are."""
    if (
        source.startswith(BUILTIN_PREFIX)
        or source == REMOTE_SOURCE
        or url_scheme(source) is not None
        or Path(source).is_absolute()
    ):
        return source
    candidate = (base / source).resolve()
    return str(candidate) if candidate.exists() else source


@lru_cache
def get_registry() -> Registry:
    return load_registry(get_settings().models_file)
