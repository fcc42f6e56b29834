"""Flower as `make run` starts it (ops/devstack.py's own command and environment), against the
test Redis while a real worker runs: its API lists the worker and its queue behind basic auth,
and refuses requests without it. Prometheus's /metrics and the health check stay open."""

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmq.settings import Settings
from ops.console import ROOT
from ops.services import Services, child_env
from ops.stack_config import child_commands, flower_password
from tests.factories import free_port, stop_worker

WORKER_QUEUE = "llmq.tiny-llama.cpu"


@pytest.fixture(scope="module")
def flower(worker, database_url, redis_url, tmp_path_factory):
    """(base URL, basic-auth credentials) of a running Flower."""
    settings = Settings(flower_port=free_port(), api_host="127.0.0.1")
    password = flower_password(settings)
    env = child_env(Services(database_url, redis_url, []))
    env["LLMQ_FLOWER_PASSWORD"] = password
    log_path = Path(tmp_path_factory.mktemp("flower")) / "flower.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            child_commands(settings)["flower"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{settings.flower_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"Flower exited: {log_path.read_text()[-2000:]}"
            try:
                if httpx.get(f"{base_url}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "Flower did not answer within 60 s"
            time.sleep(0.3)
        yield base_url, (settings.flower_user, password)
    finally:
        stop_worker(process)


def test_flower_api_lists_the_running_worker_and_its_queue(flower):
    base_url, auth = flower
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(
            f"{base_url}/api/workers", params={"refresh": 1}, auth=auth, timeout=10
        )
        assert response.status_code == 200, response.text
        workers = {
            name: info for name, info in response.json().items() if name.startswith("tiny-llama.")
        }
        if workers:
            break
        assert time.monotonic() < deadline, f"Flower lists no tiny-llama worker: {response.json()}"
        time.sleep(0.5)
    queues = {q["name"] for info in workers.values() for q in info.get("active_queues") or []}
    assert WORKER_QUEUE in queues

    lengths = httpx.get(f"{base_url}/api/queues/length", auth=auth, timeout=10)
    assert lengths.status_code == 200, lengths.text
    assert WORKER_QUEUE in {q["name"] for q in lengths.json()["active_queues"]}


def test_flower_refuses_requests_without_the_password(flower):
    base_url, (user, _) = flower
    assert httpx.get(f"{base_url}/api/workers", timeout=10).status_code == 401
    wrong = httpx.get(f"{base_url}/api/workers", auth=(user, "wrong"), timeout=10)
    assert wrong.status_code == 401
    assert httpx.get(f"{base_url}/workers", timeout=10).status_code == 401


def test_flower_metrics_and_healthcheck_open_for_prometheus(flower):
    base_url, _ = flower
    metrics = httpx.get(f"{base_url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "flower_events_total" in metrics.text
    assert httpx.get(f"{base_url}/healthcheck", timeout=10).text == "OK"


def test_llmq_flower_refuses_to_start_without_a_password(database_url, redis_url):
    env = child_env(Services(database_url, redis_url, []))
    env.pop("LLMQ_FLOWER_PASSWORD", None)
    result = subprocess.run(
        ["llmq", "flower", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "LLMQ_FLOWER_PASSWORD" in result.stderr
