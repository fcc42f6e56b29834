"""Starts a real llmq stack for a benchmark: its own database, the API and workers as processes."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from redis import Redis
from sqlalchemy.engine import make_url

from bench.servers import pinned_to
from db.admin import create_database, migrate

ROOT = Path(__file__).resolve().parent.parent


def bench_urls(database: str = "llmq_bench") -> tuple[str, str]:
    server = make_url(
        os.environ.get("LLMQ_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/llmq")
    )
    redis_base = os.environ.get("LLMQ_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
    return server.set(database=database).render_as_string(False), f"{redis_base}/13"


def stack_env(workdir: Path, models: list[dict], database_url: str, redis_url: str) -> dict:
    models_file = workdir / "models.bench.yaml"
    models_file.write_text(yaml.safe_dump({"models": models}))
    return os.environ | {
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_REDIS_URL": redis_url,
        "LLMQ_MODELS_FILE": str(models_file),
        "LLMQ_DATA_DIR": str(workdir),
        "LLMQ_LOG_LEVEL": "WARNING",
        # Benchmarks measure the queue and the model; bench.auth turns auth on to measure it.
        "LLMQ_AUTH": "off",
    }


def start_worker(
    models: str | list[str], env: dict, workdir: Path, cpus: set[int] | None = None
) -> subprocess.Popen:
    """A worker of one model, or of several (a list, optionally ending in worker options such
    as "--max-loaded-models=1"), on `cpus` if given."""
    log = open(workdir / "workers.log", "ab")  # noqa: SIM115
    command = [sys.executable, "-m", "llmq.cli", "worker", "--device", "cpu"]
    for model in [models] if isinstance(models, str) else models:
        command += [model] if model.startswith("--") else ["--model", model]
    return subprocess.Popen(
        [*command, "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=pinned_to(cpus),
    )


@contextmanager
def llmq_stack(
    models: list[dict],
    workdir: Path,
    worker_models: list[str | list[str]],
    port: int = 8765,
    redis_url: str | None = None,
    database: str = "llmq_bench",
    database_url: str | None = None,
    api_log: Path | None = None,
    cpus: set[int] | None = None,
    **settings: str,
):
    """Yields the API base URL and the processes once every named worker consumes its queue
    (an entry of `worker_models` that is a list: one worker of those models, see start_worker).

    `redis_url` replaces the benchmark's Redis database and `database` its Postgres database
    (both are emptied first), so that two benchmarks can run at once; `database_url` names a
    database on another server instead (a private one the benchmark stops and starts).
    `api_log` takes the API's output instead of the console; `cpus` pins the API and the
    workers (their threads and children too) to those cores; `settings` are extra LLMQ_*
    variables.
    """
    bench_database_url, default_redis_url = bench_urls(database)
    database_url = database_url or bench_database_url
    redis_url = redis_url or default_redis_url
    create_database(database_url, replace=True)
    migrate(database_url)
    Redis.from_url(redis_url).flushdb()
    env = stack_env(workdir, models, database_url, redis_url) | settings
    api_command = [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)]
    api_output = open(api_log, "ab") if api_log is not None else None  # noqa: SIM115
    processes = [
        subprocess.Popen(
            [*api_command, "--log-level", "warning", "--no-access-log"],
            cwd=ROOT,
            env=env,
            stdout=api_output,
            stderr=subprocess.STDOUT if api_output is not None else None,
            preexec_fn=pinned_to(cpus),
        )
    ]
    processes += [start_worker(model, env, workdir, cpus) for model in worker_models]
    base = f"http://127.0.0.1:{port}"
    try:
        served = [m for w in worker_models for m in ([w] if isinstance(w, str) else w)]
        served = [m for m in served if not m.startswith("--")]
        _wait_for_workers(base, served, processes, env.get("LLMQ_BOOTSTRAP_ADMIN_KEY"))
        yield base, processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_for_workers(
    base: str, models: list[str], processes, api_key: str | None, timeout: float = 180
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a benchmark process exited during start-up")
        try:
            models_page = httpx.get(f"{base}/v1/models", headers=headers).json()
            live = {m["id"] for m in models_page["data"] if m["live"]}
            if set(models) <= live:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the benchmark stack did not come up")


@contextmanager
def baseline_server(model_dir: Path, port: int = 8766):
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.baseline_server", str(model_dir), str(port)], cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/docs")
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        process.wait(30)
