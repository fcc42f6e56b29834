"""The one place configuration is read: environment variables with the LLMQ_ prefix, or `.env`."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
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
    flower_port: int = 5555

    # Worker identity: one worker process serves one model on one device.
    worker_model: str = "tiny-llama"
    worker_device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    # The longest a job may run; the broker redelivers unacknowledged messages after
    # visibility_timeout, so it must stay well above this.
    job_time_limit_s: int = 600
    broker_visibility_timeout_s: int = 3600

    log_level: str = "INFO"
    log_json: bool = True
    workers_cache_s: float = Field(
        default=2.0, description="How long /v1/models trusts a worker poll"
    )


@lru_cache
def get_settings() -> Settings:
    """Settings are read once per process; tests call get_settings.cache_clear() to re-read."""
    return Settings()
