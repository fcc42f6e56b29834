"""Remote-model fixtures: the upstream, a second llmq (its own API process, worker, Postgres
database and Redis database) serving tiny-evals, reached through a link the tests can cut or
make misbehave; and a worker of the front's remote model `tiny-remote`."""

import os
import subprocess
import time
from dataclasses import dataclass

import httpx
import pytest
from redis import Redis
from sqlalchemy.engine import make_url

from tests.conftest import DATABASE_URL, REDIS_URL, UPSTREAM_LINK_PORT
from tests.factories import (
    AUTH,
    create_database,
    drop_database,
    migrate,
    start_api,
    start_worker,
    stop_worker,
    wait_for_queue,
)
from tests.faults import HttpFaultLink

MODEL = "tiny-remote"
QUEUE = "llmq.tiny-remote.remote"
UPSTREAM_MODEL = "tiny-evals"


def _upstream_urls() -> tuple[str, str]:
    url = make_url(DATABASE_URL)
    base, db = REDIS_URL.rsplit("/", 1)
    redis_db = os.environ.get("LLMQ_TEST_UPSTREAM_REDIS_DB", str(int(db) - 1 if int(db) else 1))
    return url.set(database=f"{url.database}_upstream").render_as_string(
        False
    ), f"{base}/{redis_db}"


UPSTREAM_DATABASE_URL, UPSTREAM_REDIS_URL = _upstream_urls()


@dataclass
class Upstream:
    base_url: str  # the upstream API itself, for requests sent to it directly
    link: HttpFaultLink  # what the front's remote model reaches it through
    api: subprocess.Popen
    worker: subprocess.Popen

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=AUTH, timeout=60)

    def complete(self, **body) -> dict:
        """A greedy completion asked of the upstream directly."""
        body = {"model": UPSTREAM_MODEL, "temperature": 0, **body}
        with self.client() as client:
            response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="session")
def upstream(database_url, redis_url, tiny_model_path):
    create_database(UPSTREAM_DATABASE_URL, replace=True)
    migrate(UPSTREAM_DATABASE_URL, "head")
    Redis.from_url(UPSTREAM_REDIS_URL).flushdb()
    env = {"LLMQ_DATABASE_URL": UPSTREAM_DATABASE_URL, "LLMQ_REDIS_URL": UPSTREAM_REDIS_URL}
    worker = start_worker(UPSTREAM_MODEL, log_name="upstream-worker", **env)
    api, base_url = start_api(log_name="upstream-api", **env)
    link = HttpFaultLink(int(base_url.rsplit(":", 1)[1]), port=UPSTREAM_LINK_PORT)
    try:
        _wait_until_served(base_url, worker)
        yield Upstream(base_url, link, api, worker)
    finally:
        link.close()
        stop_worker(api)
        stop_worker(worker)
        drop_database(UPSTREAM_DATABASE_URL)


def _wait_until_served(base_url: str, worker: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the upstream's worker exited; see upstream-worker.log"
        models = httpx.get(f"{base_url}/v1/models", headers=AUTH).json()["data"]
        if any(m["id"] == UPSTREAM_MODEL and m["live"] for m in models):
            return
        time.sleep(0.3)
    raise TimeoutError("the upstream never served its model")


@pytest.fixture(scope="session")
def remote_worker(upstream, database_url, redis_url):
    """A worker of the front's remote model (it loads no weights)."""
    process = start_worker(MODEL)
    try:
        wait_for_queue(QUEUE, process)
        yield process
    finally:
        stop_worker(process)


@pytest.fixture
def healthy_upstream(upstream, remote_worker):
    """The upstream as it should be, its breaker closed, before and after the test."""
    _heal(upstream)
    yield upstream
    _heal(upstream)


def _heal(upstream: Upstream) -> None:
    upstream.link.fail_with = None
    upstream.link.hang = False
    upstream.link.error_times.clear()
    upstream.link.cut()  # drops connections a test left hanging
    upstream.link.restore()
    redis = Redis.from_url(REDIS_URL)
    for key in redis.scan_iter(f"llmq:breaker:{MODEL}:*"):
        redis.delete(key)
    redis.delete(f"llmq:breaker-probe:{MODEL}")
