"""Test helpers in one place: databases, migrations, worker processes, job polling."""

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from db.admin import create_database, downgrade, drop_database, migrate
from db.session import session_scope

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["create_database", "downgrade", "drop_database", "migrate"]

# The suite's admin key: conftest makes it LLMQ_BOOTSTRAP_ADMIN_KEY.
ADMIN_KEY = "llmq_test-suite-admin-key"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


AUTH = bearer(ADMIN_KEY)


def api_client(base_url: str, headers: dict[str, str] = AUTH, **options) -> httpx.Client:
    """An HTTP client for an API server, sending the suite's admin key unless told otherwise."""
    return httpx.Client(base_url=base_url, headers=headers, **options)


def start_worker(model: str, log_name: str | None = None, **env: str) -> subprocess.Popen:
    """A real `llmq worker` subprocess; `env` overrides settings (LLMQ_REDIS_URL=...)."""
    log_file = f"{log_name or f'worker-{model}'}.log"
    log = open(Path(os.environ["LLMQ_DATA_DIR"]) / log_file, "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "llmq.cli", "worker", "--model", model, "--device", "cpu"],
        cwd=ROOT,
        env=os.environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_api(
    timeout: float = 60, log_name: str = "api", **env: str
) -> tuple[subprocess.Popen, str]:
    """The API under uvicorn; `env` overrides settings (LLMQ_REDIS_URL=...)."""
    port = free_port()
    log = open(Path(os.environ["LLMQ_DATA_DIR"]) / f"{log_name}.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
        cwd=ROOT,
        env=os.environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/healthz").status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_worker(process)
            raise RuntimeError("the API server did not start; see api.log")
        time.sleep(0.2)


def stop_worker(process: subprocess.Popen, timeout: float = 30) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_queue(queue: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Block until a worker answers Celery's broadcast as a consumer of `queue`."""
    from api.intake.enqueue import producer

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}; see its log")
        replies = producer().control.inspect(timeout=0.5).active_queues() or {}
        if any(q["name"] == queue for qs in replies.values() for q in qs):
            return
    raise TimeoutError(f"no worker consumed {queue} within {timeout}s")


def submit(client, headers: dict[str, str] | None = None, **body) -> dict:
    """Submit a job (as the client's key, or the one in `headers`) and return it."""
    body.setdefault("model", "tiny-llama")
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def create_key(admin_client, name: str = "test key", **fields) -> dict:
    """A new API key made through the admin API: its row, with the key itself under "key"."""
    response = admin_client.post("/v1/admin/keys", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def record_usage(
    database_url: str,
    owner: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    model: str = "tiny-llama",
    cached: bool = False,
    at: datetime | None = None,
) -> None:
    """A finished job and its usage row, as a worker (or the cache) writes them, at `at`."""
    from db.tables import Job, Usage

    job_id = uuid.uuid4()
    at = at or datetime.now(UTC)
    with session_scope(database_url) as session:
        session.add(
            Job(
                id=job_id, kind="generate", model=model, queue=f"llmq.{model}.cpu",
                status="succeeded", input={"prompt": "recorded"}, params={}, owner=owner,
                attempts=1, created_at=at, finished_at=at,
            )
        )  # fmt: skip
        session.flush()
        session.add(
            Usage(
                job_id=job_id, owner=owner, model=model, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, cached=cached, created_at=at,
            )
        )  # fmt: skip


def wait_for_job(client, job_id: str, timeout: float = 60, until=("succeeded", "failed")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout}s"
        time.sleep(0.05)


def read_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format as {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value; 0 for a series not exposed yet, as a counter that never moved."""
    return samples.get((name, frozenset(labels.items())), 0.0)
