"""The one place configuration is read: environment variables with the LLMQ_ prefix, or `.env`."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_", env_file=".env", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/llmq"
    redis_url: str = "redis://127.0.0.1:6379/0"
    models_file: Path = PROJECT_ROOT / "models.yaml"
    data_dir: Path = PROJECT_ROOT / ".llmq"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Larger request bodies are refused with 413 before they are parsed.
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Longer prompts (in characters, a chat's messages together) are refused with 400 before
    # they are tokenized, on every endpoint that takes one.
    max_prompt_chars: int = Field(default=1_000_000, ge=1)

    # Postgres connections of one process (db/session.py), and how long a thread waits for one
    # before the request answers 503. A request holds one connection at most, at one time. The
    # pool keeps db_pool_size connections open once used, enough for db_request_slots and the
    # background threads: one returned beyond it is closed, and the next opened costs Postgres
    # a backend's start (bench.jobpath's "PG sessions" column counts them; `python -m
    # bench.side_by_side LLMQ_DB_POOL_SIZE=10 LLMQ_DB_MAX_OVERFLOW=20` measures a smaller
    # pool). The overflow is for bursts beyond that.
    db_pool_size: int = Field(default=25, ge=1)
    db_max_overflow: int = Field(default=5, ge=0)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)
    # How many requests of one API process may use Postgres at once (api/http/limits.py). The rest
    # of the pool is left to the background threads (reconciler, drivers, key look-ups). A
    # request waits at most db_wait_s for its turn, and only while fewer than db_waiting_max
    # wait; otherwise it is answered 503 with Retry-After at once.
    db_request_slots: int = Field(default=20, ge=1)
    db_wait_s: float = Field(default=5.0, gt=0)
    db_waiting_max: int = Field(default=500, ge=0)
    # Comment lines sent on an idle event stream, from its start, so that clients and proxies
    # see it alive while a job waits (a broker outage, a long queue).
    sse_ping_s: float = Field(default=15.0, gt=0)
    flower_port: int = 5555
    # Flower serves only behind basic auth; `make run` makes a password up when none is set.
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    # Worker identity: the model a worker serves on its device, or several (a JSON list in
    # LLMQ_WORKER_MODELS: `llmq worker --model a --model b`), of which at most
    # worker_max_loaded_models are loaded at once (0: all), the least recently used evicted.
    # A message for a model that cannot be loaded within worker_model_wait_s goes back to the
    # queue for another worker.
    worker_model: str = "stories260K"
    worker_models: list[str] = Field(default_factory=list)
    worker_max_loaded_models: int = Field(default=0, ge=0)
    worker_model_wait_s: float = Field(default=2.0, ge=0)
    worker_device: Literal["auto", "cpu", "cuda", "mps", "remote"] = "auto"  # remote: source remote
    # Where each worker serves its Prometheus metrics; 0 turns the endpoint off. Workers that
    # share a host need a port each (`llmq worker --metrics-port`).
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)
    # Where a worker's batching engine runs (workers/engine_process.py): in a child process of
    # its own that loads the model, fed through a pipe, so that the Celery threads, the result
    # writer and the token publisher never hold the GIL its decode loop needs; or, when false,
    # in a thread of the worker process, as before (for comparison, and for the engine's tests).
    engine_process: bool = Field(
        default=True,
        description="Run the worker's engine in its own process (false: a thread of the worker)",
    )

    # Once a process has started, what it holds is frozen out of the garbage collector's full
    # collections and its young generation is collected every gc_young_threshold allocations
    # rather than CPython's 700 (llmq/heap.py); 0 leaves the collector as CPython sets it.
    gc_young_threshold: int = Field(default=10_000, ge=0)
    # A prefill or scoring pass of fewer tokens (rows x columns) than this runs on the decode
    # pass's torch threads (workers/engine_main.py, pass_threads): a small pass gains too little
    # wall time from every core to pay for the CPU the other work on the host needs; 0: every
    # such pass on every core.
    small_pass_tokens: int = Field(default=1024, ge=0)

    # The longest a job may run; the broker redelivers unacknowledged messages after
    # visibility_timeout, so it must stay well above this.
    job_time_limit_s: int = 600
    broker_visibility_timeout_s: int = 3600

    # Delivery guarantees (api/background/reconciler.py): how often to sweep, when a queued job's
    # message counts as lost, when a worker without heartbeats counts as lost (Celery's workers send
    # one every 2 s), and how many lost workers a job may take down with it before it fails.
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    requeue_after_s: float = Field(default=60.0, gt=0)
    worker_lost_after_s: float = Field(default=5.0, gt=0)
    max_job_attempts: int = Field(default=3, ge=1)
    # How often the Batch API's driver moves batches along and refills its windows
    # (api/background/batch_driver.py).
    batch_interval_s: float = Field(default=0.25, gt=0)
    # How often the Batch API's and the evaluation runs' drivers look for new work while they
    # have none (a batch or run created through this process starts at once).
    background_idle_interval_s: float = Field(default=2.0, gt=0)
    # How long the API may hold jobs that arrive together to send them in one message
    # (api/intake/enqueue.py); 0 sends each burst as it stands.
    send_linger_ms: float = Field(default=5.0, ge=0, le=100)

    log_level: str = "INFO"
    log_json: bool = True
    workers_cache_s: float = Field(
        default=2.0, description="How long /v1/models trusts a worker poll"
    )

    # Evaluation runs (api/background/eval_driver.py): where local benchmark data lives (default
    # <data_dir>/evals; runs may read local folders only under it), how often runs are advanced,
    # and how many jobs a run keeps queued or running at once (0: four batches of its model),
    # so that a long run never buries other jobs deep in the model's queue.
    eval_data_dir: Path | None = None
    eval_interval_s: float = Field(default=0.25, gt=0)
    eval_jobs_in_flight: int = Field(default=0, ge=0)

    # API keys (api/http/auth.py). Auth is on unless turned off explicitly (LLMQ_AUTH=off); then
    # every caller acts as a local admin. The bootstrap key is made to exist, as an admin key,
    # when the API starts. (The CLI's client commands send LLMQ_API_KEY.)
    auth: bool = True
    bootstrap_admin_key: SecretStr | None = Field(default=None, min_length=16)
    # How long an API process trusts what it read about a key: another process's revocation or
    # new limits take effect within this many seconds (at once in the process that made them).
    auth_cache_s: float = Field(default=5.0, ge=0)
    # Limits of a key that does not set its own (api/http/limits.py); 0 means no limit. The token
    # quota counts prompt and completion tokens computed for the key in the calendar month (UTC).
    rate_limit_per_minute: int = Field(default=600, ge=0)
    max_concurrent_jobs: int = Field(default=64, ge=0)
    monthly_token_quota: int = Field(default=0, ge=0)

    # Completion cache (api/intake/submit.py, db/queries/cache.py): deterministic requests are
    # answered from an identical earlier one, and identical ones in flight share one run.
    # LLMQ_CACHE=off turns both off; entries older than cache_ttl_s are computed anew (0: they
    # never expire).
    cache: bool = True
    cache_ttl_s: float = Field(default=7 * 86_400, ge=0)

    @model_validator(mode="after")
    def requests_leave_room_in_the_pool(self) -> "Settings":
        pool = self.db_pool_size + self.db_max_overflow
        if self.db_request_slots >= pool:
            raise ValueError(
                f"db_request_slots is {self.db_request_slots}; it must stay below the pool's "
                f"{pool} connections (db_pool_size + db_max_overflow), which the background "
                "threads share"
            )
        return self

    @property
    def eval_data_root(self) -> Path:
        return self.eval_data_dir or self.data_dir / "evals"


@lru_cache
def get_settings() -> Settings:
    """Settings are read once per process; tests call get_settings.cache_clear() to re-read."""
    return Settings()
