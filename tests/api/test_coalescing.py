"""Identical deterministic jobs in flight share one run: the jobs submitted while the first is
queued follow it, are never sent to the broker, and get its outcome when it has one.

The jobs are submitted to `tiny-coalesce` before its worker starts, so that they are all in
flight together."""

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from redis import Redis
from sqlalchemy import select

from api.background.reconciler import waiting_job_ids
from db.session import session_scope
from db.tables import Job, JobResult, Usage
from tests.factories import start_worker, stop_worker, submit, wait_for_job, wait_for_queue

MODEL = "tiny-coalesce"
QUEUE = f"llmq.{MODEL}.cpu"
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def start_coalesce_worker(database_url, redis_url, tiny_model_path):
    """Starts a worker of tiny-coalesce on demand, and stops it after the test."""
    started = []

    def start() -> None:
        process = start_worker(MODEL)
        started.append(process)
        wait_for_queue(QUEUE, process)

    yield start
    for process in started:
        stop_worker(process)


def job_body(label: str) -> dict:
    prompt = f"{label} {uuid.uuid4().hex[:8]}"
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "ignore_eos": True}


def rows(database_url: str, job_ids: list[str]) -> dict[str, Job]:
    with session_scope(database_url) as session:
        found = session.scalars(select(Job).where(Job.id.in_([uuid.UUID(i) for i in job_ids])))
        return {str(job.id): job for job in found}


def cached_usage(database_url: str, job_ids: list[str]) -> dict[str, bool]:
    with session_scope(database_url) as session:
        usage = session.execute(
            select(Usage.job_id, Usage.cached).where(Usage.job_id.in_(map(uuid.UUID, job_ids)))
        )
        return {str(job_id): cached for job_id, cached in usage}


def read_stream(client, job_id: str, into: list) -> None:
    """The job's SSE events, (type, data), until its stream ends."""
    kind = None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind is not None:
                into.append((kind, json.loads(line[len("data: ") :])))
                if kind in ("done", "error"):
                    return


def test_identical_jobs_in_flight_share_one_run(
    client, app, database_url, redis_url, start_coalesce_worker
):
    body = job_body("Once upon a time")
    with ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(lambda _: submit(client, **body), range(6)))
    opted_out = submit(client, **body, cache=False)
    ids = [job["id"] for job in jobs]

    leaders = [job for job in jobs if job["follows_job_id"] is None]
    assert len(leaders) == 1, jobs
    leader = leaders[0]["id"]
    followers = [i for i in ids if i != leader]
    assert all(job["status"] == "queued" for job in jobs)
    assert {job["follows_job_id"] for job in jobs if job["id"] != leader} == {leader}
    assert opted_out["follows_job_id"] is None

    app.state.reconciler.sweep()
    waiting = waiting_job_ids(Redis.from_url(redis_url), {QUEUE})
    assert {leader, opted_out["id"]} <= waiting and not waiting & set(followers)

    stream: list = []
    reader = threading.Thread(target=read_stream, args=(client, followers[0], stream))
    reader.start()
    start_coalesce_worker()
    done = {i: wait_for_job(client, i, until=FINAL) for i in [*ids, opted_out["id"]]}
    reader.join(60)

    assert {job["status"] for job in done.values()} == {"succeeded"}
    text = done[leader]["result"]["text"]
    assert {job["result"]["text"] for job in done.values()} == {text}
    assert all(done[i]["result"]["usage"]["completion_tokens"] == 12 for i in ids)
    stored = rows(database_url, ids)
    assert stored[leader].worker is not None and stored[leader].attempts == 1
    assert all(stored[i].worker is None and stored[i].attempts == 0 for i in followers)
    assert cached_usage(database_url, ids) == {i: i != leader for i in ids}
    with session_scope(database_url) as session:
        results = session.scalars(
            select(JobResult.job_id).where(JobResult.job_id.in_([uuid.UUID(i) for i in ids]))
        )
        assert len(list(results)) == len(ids), "one result row per job"
    assert [kind for kind, _ in stream] == ["token", "done"]
    assert stream[0][1]["text"] == stream[1][1]["text"] == text
    assert submit(client, **body)["cache_hit"] is True


def test_cancelled_leader_hands_its_followers_a_run_of_their_own(
    client, database_url, start_coalesce_worker
):
    body = job_body("The quick brown fox")
    leader, first, second, third = (submit(client, **body)["id"] for _ in range(4))

    cancelled_follower = client.post(f"/v1/jobs/{third}/cancel").json()
    assert cancelled_follower["status"] == "cancelled"
    assert rows(database_url, [first, second])[first].follows_job_id == uuid.UUID(leader)

    assert client.post(f"/v1/jobs/{leader}/cancel").json()["status"] == "cancelled"
    heir, follower = (rows(database_url, [first, second])[i] for i in (first, second))
    assert heir.follows_job_id is None and heir.enqueued_at is None
    assert follower.follows_job_id == heir.id

    start_coalesce_worker()
    done = {i: wait_for_job(client, i, until=FINAL) for i in (first, second)}

    assert done[first]["status"] == done[second]["status"] == "succeeded"
    assert done[first]["result"]["text"] == done[second]["result"]["text"]
    stored = rows(database_url, [leader, first, second, third])
    assert stored[first].worker is not None and stored[second].worker is None
    assert stored[leader].status == stored[third].status == "cancelled"
    assert cached_usage(database_url, [first, second]) == {first: False, second: True}
    stream: list = []
    read_stream(client, second, stream)
    assert stream[-1][0] == "done" and stream[-1][1]["text"] == done[second]["result"]["text"]


def test_leader_that_times_out_hands_its_followers_a_run(
    client, database_url, start_coalesce_worker
):
    body = job_body("A queue holds jobs")
    doomed = submit(client, **body, timeout_s=0.000001)["id"]
    first, second = (submit(client, **body)["id"] for _ in range(2))
    assert rows(database_url, [first])[first].follows_job_id == uuid.UUID(doomed)

    start_coalesce_worker()
    done = {i: wait_for_job(client, i, until=FINAL) for i in (doomed, first, second)}

    assert done[doomed]["status"] == "failed"
    assert done[doomed]["error"]["category"] == "timeout"
    assert done[first]["status"] == done[second]["status"] == "succeeded"
    stored = rows(database_url, [first, second])
    assert stored[first].worker is not None and stored[second].follows_job_id == stored[first].id
