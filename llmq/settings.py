"""The one place configuration is read: environment variables with the LLMQ_ prefix, or `.env`."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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
    flower_port: int = 5555
    # Flower serves only behind basic auth; `make run` makes a password up when none is set.
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    # Worker identity: one worker process serves one model on one device.
    worker_model: str = "tiny-llama"
    worker_device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Where each worker serves its Prometheus metrics; 0 turns the endpoint off. Workers that
    # share a host need a port each (`llmq worker --metrics-port`).
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)

    # The longest a job may run; the broker redelivers unacknowledged messages after
    # visibility_timeout, so it must stay well above this.
    job_time_limit_s: int = 600
    broker_visibility_timeout_s: int = 3600

    # Delivery guarantees (api/reconciler.py): how often to sweep, when a queued job's message
    # counts as lost, when a silent worker counts as lost, and how many lost workers a job may
    # take down with it before it fails.
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    requeue_after_s: float = Field(default=60.0, gt=0)
    worker_lost_after_s: float = Field(default=30.0, gt=0)
    max_job_attempts: int = Field(default=3, ge=1)

    log_level: str = "INFO"
    log_json: bool = True
    workers_cache_s: float = Field(
        default=2.0, description="How long /v1/models trusts a worker poll"
    )

    # Evaluation runs (api/eval_driver.py): where local benchmark data lives (default
    # <data_dir>/evals; runs may read local folders only under it), how often runs are advanced,
    # and how many jobs a run keeps queued or running at once (0: four batches of its model),
    # so that a long run never buries other jobs deep in the model's queue.
    eval_data_dir: Path | None = None
    eval_interval_s: float = Field(default=0.25, gt=0)
    eval_jobs_in_flight: int = Field(default=0, ge=0)

    @property
    def eval_data_root(self) -> Path:
        return self.eval_data_dir or self.data_dir / "evals"


@lru_cache
def get_settings() -> Settings:
    """Settings are read once per process; tests call get_settings.cache_clear() to re-read."""
    return Settings()
