"""Token streaming over SSE: live, late join, resume with Last-Event-ID, disconnect, Postgres
fallback, and no leaked Redis subscriptions."""

import json
import time

import httpx
import pytest
from httpx_sse import connect_sse
from redis import Redis

from llmq.events import events_key
from tests.factories import AUTH


def submit(base: str, **body) -> dict:
    body = {"model": "tiny-llama", "prompt": "Once upon a time"} | body
    response = httpx.post(f"{base}/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()


def read_events(base: str, job_id: str, last_event_id: str | None = None, limit: int | None = None):
    headers = AUTH | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    events = []
    with httpx.Client(timeout=60) as http:
        with connect_sse(http, "GET", f"{base}/v1/jobs/{job_id}/events", headers=headers) as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                events.append(sse)
                if sse.event in ("done", "error") or (limit and len(events) >= limit):
                    break
    return events


def wait_done(base: str, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline
        time.sleep(0.05)


def texts(events) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "token")


def test_stream_deltas_concatenate_to_the_stored_text(api_server):
    submitted_at = time.time()
    job = submit(api_server, max_tokens=40, ignore_eos=True)
    events = read_events(api_server, job["id"])
    received_at = time.time()
    assert events[-1].event == "done"
    done = json.loads(events[-1].data)
    stored = wait_done(api_server, job["id"])["result"]
    assert texts(events) == stored["text"] == done["text"]
    assert done["completion_tokens"] == 40 and done["finish_reason"] == "length"
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids), "every event id is unique"
    # Each delta says when the worker made it, in order, within the job's life.
    made = [json.loads(e.data)["created"] for e in events if e.event == "token"]
    assert made == sorted(made) and submitted_at <= made[0] and made[-1] <= received_at


def test_late_join_after_finish_gets_everything_once(api_server):
    job = submit(api_server, max_tokens=20, ignore_eos=True)
    stored = wait_done(api_server, job["id"])["result"]["text"]
    events = read_events(api_server, job["id"])
    assert texts(events) == stored
    assert events[-1].event == "done"


def test_resume_with_last_event_id_sends_each_token_once(api_server):
    job = submit(api_server, max_tokens=60, ignore_eos=True)
    first = read_events(api_server, job["id"], limit=5)
    assert all(e.event == "token" for e in first)
    rest = read_events(api_server, job["id"], last_event_id=first[-1].id)
    stored = wait_done(api_server, job["id"])["result"]["text"]
    assert texts(first) + texts(rest) == stored
    assert not {e.id for e in first} & {e.id for e in rest}


def test_disconnect_mid_stream_leaves_the_job_running_and_unsubscribes(api_server, redis_url):
    redis = Redis.from_url(redis_url)
    job = submit(api_server, max_tokens=120, ignore_eos=True)
    read_events(api_server, job["id"], limit=2)  # then the client goes away
    finished = wait_done(api_server, job["id"])
    assert finished["status"] == "succeeded"
    assert finished["result"]["usage"]["completion_tokens"] == 120
    deadline = time.monotonic() + 10
    while redis.pubsub_numsub(events_key(job["id"]))[0][1] != 0:
        assert time.monotonic() < deadline, "the stream's Redis subscription was never closed"
        time.sleep(0.1)


def test_many_streams_leave_no_subscriptions_behind(api_server, redis_url):
    redis = Redis.from_url(redis_url)
    jobs = [submit(api_server, max_tokens=8, prompt=f"p{i}") for i in range(6)]
    for job in jobs:
        read_events(api_server, job["id"])
    deadline = time.monotonic() + 10
    while [k for k in redis.pubsub_channels("llmq:events:*")]:
        assert time.monotonic() < deadline, redis.pubsub_channels("llmq:events:*")
        time.sleep(0.1)


def test_expired_buffer_is_rebuilt_from_postgres(api_server, redis_url):
    job = submit(api_server, max_tokens=10, ignore_eos=True)
    stored = wait_done(api_server, job["id"])["result"]["text"]
    Redis.from_url(redis_url).delete(events_key(job["id"]))
    events = read_events(api_server, job["id"])
    assert texts(events) == stored
    assert json.loads(events[-1].data)["status"] == "succeeded"


def test_random_bytes_stream_still_concatenates_to_the_stored_text(api_server):
    # Sampling at high temperature from a byte-level vocabulary produces partial and invalid
    # UTF-8; the deltas must still add up to exactly the stored text.
    job = submit(
        api_server, max_tokens=80, temperature=2.0, seed=5, ignore_eos=True, prompt="漢字 🙂 Ünï"
    )
    events = read_events(api_server, job["id"])
    deltas = [json.loads(e.data)["text"] for e in events if e.event == "token"]
    assert len(deltas) > 1
    assert "".join(deltas) == wait_done(api_server, job["id"])["result"]["text"]


def test_stop_string_spanning_tokens_is_never_streamed(api_server):
    free = wait_done(
        api_server, submit(api_server, prompt="A queue", max_tokens=30, ignore_eos=True)["id"]
    )["result"]["text"]
    stop = free[8:12]
    job = submit(api_server, prompt="A queue", max_tokens=30, ignore_eos=True, stop=[stop])
    events = read_events(api_server, job["id"])
    assert texts(events) == free[: free.find(stop)]
    assert json.loads(events[-1].data)["finish_reason"] == "stop"


def test_cancelled_queued_job_ends_its_stream(api_server):
    job = submit(api_server, model="tiny-offline", prompt="never")
    httpx.post(f"{api_server}/v1/jobs/{job['id']}/cancel", headers=AUTH)
    events = read_events(api_server, job["id"])
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["status"] == "cancelled"


@pytest.mark.parametrize("header", ["abc", "1-x", "--"])
def test_malformed_last_event_id_is_400(api_server, header):
    job = submit(api_server, max_tokens=2)
    response = httpx.get(
        f"{api_server}/v1/jobs/{job['id']}/events", headers=AUTH | {"Last-Event-ID": header}
    )
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json()["error"]["message"]


def test_stream_of_unknown_job_is_404(api_server):
    response = httpx.get(
        f"{api_server}/v1/jobs/00000000-0000-0000-0000-000000000000/events", headers=AUTH
    )
    assert response.status_code == 404
