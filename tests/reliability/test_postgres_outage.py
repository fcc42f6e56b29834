"""Postgres unavailable: the API answers 503 with Retry-After, never 500, and readiness goes
red; a worker keeps its finished job's result and its message until Postgres is back."""

import time

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from tests.factories import (
    AUTH,
    start_worker,
    stop_worker,
    submit,
    wait_for_job,
    wait_for_queue,
)
from tests.faults import LONG_JOB, QUEUE, CuttableLink, running_on, wait_until


@pytest.fixture
def postgres_link(database_url):
    link = CuttableLink(5432)
    yield link
    link.close()


@pytest.fixture
def app_via_link(postgres_link, database_url, redis_url, tiny_model_path):
    """A second API whose every Postgres connection passes through the link."""
    from api.main import create_app
    from llmq.settings import get_settings

    settings = get_settings().model_copy(
        update={"database_url": postgres_link.url_for(database_url)}
    )
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert "unavailable" in response.json()["error"]["message"]


def test_api_answers_503_while_postgres_is_down(app_via_link, postgres_link):
    job = submit(app_via_link, model="tiny-offline", prompt="before the outage", max_tokens=2)
    assert app_via_link.get("/readyz").status_code == 200

    postgres_link.cut()
    body = {"model": "tiny-offline", "prompt": "during the outage", "max_tokens": 2}
    assert_unavailable(app_via_link.post("/v1/jobs", json=body))
    assert_unavailable(app_via_link.get(f"/v1/jobs/{job['id']}"))
    assert_unavailable(app_via_link.get("/v1/jobs"))
    ready = app_via_link.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["postgres"] != "ok"

    postgres_link.restore()
    assert app_via_link.get("/readyz").status_code == 200
    assert app_via_link.post("/v1/jobs", json=body).status_code == 202


def test_worker_holds_result_and_message_until_postgres_returns(
    client, postgres_link, database_url, redis_url, monkeypatch
):
    monkeypatch.setenv("LLMQ_DATABASE_URL", postgres_link.url_for(database_url))
    worker = start_worker("tiny-faults")
    monkeypatch.undo()
    try:
        wait_for_queue(QUEUE, worker)
        job = submit(client, prompt="outage", **LONG_JOB)
        wait_until(lambda: running_on(database_url, [job["id"]], worker.pid), 60, "the job to run")
        postgres_link.cut()
        time.sleep(6)  # the generation ends meanwhile; its result cannot be written

        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        unacked = Redis.from_url(redis_url).hvals("unacked")
        assert any(job["id"].encode() in message for message in unacked), "acked too early"

        postgres_link.restore()
        finished = wait_for_job(client, job["id"], timeout=60)
        assert finished["status"] == "succeeded"
        assert finished["result"]["usage"]["completion_tokens"] == LONG_JOB["max_tokens"]
        assert finished["attempts"] == 1
        wait_until(
            lambda: (
                not any(job["id"].encode() in m for m in Redis.from_url(redis_url).hvals("unacked"))
            ),
            10,
            "the message to be acknowledged",
        )
    finally:
        stop_worker(worker)
