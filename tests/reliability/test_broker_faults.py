"""Redis failing under the queue: lost messages are sent again from Postgres, poison messages
fail alone, and open streams end cleanly instead of hanging."""

import json
import uuid

import httpx
import pytest
from httpx_sse import connect_sse
from redis import Redis

from api.background.reconciler import waiting_job_ids
from api.intake.enqueue import enqueue_job
from db.queries import jobs as job_queries
from db.session import session_scope
from tests.factories import AUTH, api_client, start_api, stop_worker, submit, wait_for_job
from tests.faults import (
    QUEUE,
    CuttableLink,
    assert_each_succeeded_once,
    submit_jobs,
    wait_until,
)

TINY_QUEUE = "llmq.tiny-llama.cpu"


@pytest.fixture
def redis_link(redis_url):
    link = CuttableLink(6379)
    yield link
    link.close()


def test_flushed_broker_loses_no_accepted_job(client, fault_workers, database_url, redis_url):
    redis = Redis.from_url(redis_url)
    job_ids = submit_jobs(client, 5)
    waiting = {str(job_id) for job_id in job_ids}
    wait_until(lambda: waiting_job_ids(redis, {QUEUE}) == waiting, 5, "the jobs to be sent")
    redis.flushdb()  # what a restart without persistence leaves behind

    wait_until(
        lambda: waiting_job_ids(redis, {QUEUE}) == waiting,
        30,
        "the reconciler to send the jobs again",
    )
    fault_workers()
    assert_each_succeeded_once(database_url, job_ids)


def test_jobs_accepted_while_broker_is_away_run_when_it_returns(worker, redis_link, redis_url):
    api, base = start_api(LLMQ_REDIS_URL=redis_link.url_for(redis_url))
    try:
        redis_link.cut()
        accepted = [
            httpx.post(f"{base}/v1/jobs", json=body, headers=AUTH, timeout=30)
            for body in (  # distinct prompts: identical ones would share one run
                {"model": "tiny-llama", "prompt": f"while redis is down {i}", "max_tokens": 4}
                for i in range(3)
            )
        ]
        assert [r.status_code for r in accepted] == [202] * 3
        assert {r.json()["status"] for r in accepted} == {"queued"}

        redis_link.restore()
        for response in accepted:
            job = wait_for_job(api_client(base), response.json()["id"], timeout=60)
            assert job["status"] == "succeeded" and job["attempts"] == 1
    finally:
        stop_worker(api)


def test_stream_ends_cleanly_when_redis_is_lost_mid_stream(worker, redis_link, redis_url):
    api, base = start_api(LLMQ_REDIS_URL=redis_link.url_for(redis_url))
    try:
        body = {"model": "tiny-llama", "prompt": "Once", "max_tokens": 100, "ignore_eos": True}
        job = httpx.post(f"{base}/v1/jobs", json=body, headers=AUTH).json()
        events = []
        with api_client(base, timeout=60) as http:
            url = f"{base}/v1/jobs/{job['id']}/events"
            with connect_sse(http, "GET", url) as source:
                for sse in source.iter_sse():
                    events.append(sse)
                    if len(events) == 2:
                        redis_link.cut()  # the API's Redis goes away; the worker's stays
                    if sse.event in ("done", "error"):
                        break
        assert events[-1].event == "done"
        text = "".join(json.loads(e.data)["text"] for e in events if e.event == "token")
        assert text == json.loads(events[-1].data)["text"]
        ids = [e.id for e in events]
        assert len(set(ids)) == len(ids)
    finally:
        redis_link.restore()
        stop_worker(api)


def test_poison_messages_fail_alone_and_the_worker_lives_on(
    live_client, worker, database_url, redis_url
):
    redis = Redis.from_url(redis_url)
    redis.lpush(TINY_QUEUE, b"\x80 not a message", json.dumps({"body": "garbage"}))
    # A job whose stored input no model code accepts.
    with session_scope(database_url) as session:
        broken = job_queries.create_job(
            session,
            job_queries.NewJob(
                kind="generate",
                model="tiny-llama",
                queue=TINY_QUEUE,
                input={"prompt": "poison"},
                params={"max_tokens": "a great many"},
            ),
        )
    assert enqueue_job(broken.id, "generate", TINY_QUEUE)
    enqueue_job(uuid.uuid4(), "generate", TINY_QUEUE)  # a message for no job at all

    failed = wait_for_job(live_client, str(broken.id))
    assert failed["status"] == "failed" and failed["attempts"] == 1  # permanent: no retry
    assert failed["error"]["category"] == "invalid_input"
    healthy = submit(live_client, prompt="still alive?", max_tokens=4)
    assert wait_for_job(live_client, healthy["id"])["status"] == "succeeded"
    assert worker.poll() is None


def test_job_past_its_deadline_fails_with_timeout(live_client):
    body = {"prompt": "slow", "max_tokens": 100, "ignore_eos": True, "timeout_s": 0.005}
    job = wait_for_job(live_client, submit(live_client, **body)["id"])
    assert job["status"] == "failed"
    assert job["error"]["category"] == "timeout"


def test_timeout_above_the_server_limit_is_refused(client):
    body = {"model": "tiny-llama", "prompt": "x", "timeout_s": 10_000}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 400
    assert "at most 600" in response.json()["error"]["message"]
