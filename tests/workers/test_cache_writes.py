"""What a worker writes for the completion cache: the entry of a deterministic job that
succeeded, in the transaction of its result, and the outcome of the jobs that follow it."""

import hashlib
import uuid
from dataclasses import replace

from sqlalchemy import select

from api.intake.enqueue import enqueue_job
from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import CompletionCache, Job
from tests.factories import submit, wait_for_job

FINAL = ("succeeded", "failed", "cancelled")


def entry_of(database_url: str, job: Job) -> CompletionCache | None:
    pieces = job.input["fingerprint"]
    with session_scope(database_url) as session:
        return session.scalars(
            select(CompletionCache).where(
                CompletionCache.model == job.model,
                CompletionCache.prompt_hash == pieces["prompt_hash"],
                CompletionCache.params_fingerprint == pieces["params_fingerprint"],
            )
        ).one_or_none()


def stored_job(database_url: str, job_id: str) -> Job:
    with session_scope(database_url) as session:
        return session.get(Job, uuid.UUID(job_id))


def test_succeeded_job_writes_its_entry(live_client, database_url):
    prompt = f"Lily liked to play {uuid.uuid4().hex[:8]}"
    done = wait_for_job(live_client, submit(live_client, prompt=prompt, max_tokens=9)["id"])

    job = stored_job(database_url, done["id"])
    entry = entry_of(database_url, job)

    assert entry is not None
    assert entry.prompt_hash == hashlib.sha256(prompt.encode()).hexdigest()
    assert entry.model_revision == job.input["fingerprint"]["model_revision"]
    assert entry.model_revision.startswith("files:"), "a local folder: its files' hash"
    result = done["result"]
    assert (entry.text, entry.finish_reason) == (result["text"], result["finish_reason"])
    assert entry.prompt_tokens == result["usage"]["prompt_tokens"]
    assert entry.completion_tokens == result["usage"]["completion_tokens"]
    assert entry.hits == 0 and entry.last_hit_at is None


def test_stop_string_result_is_cached_with_its_finish_reason(live_client, database_url):
    prompt = f"A queue {uuid.uuid4().hex[:8]}"
    free = wait_for_job(
        live_client, submit(live_client, prompt=prompt, max_tokens=20, ignore_eos=True)["id"]
    )["result"]["text"]
    body = {"prompt": prompt, "max_tokens": 20, "ignore_eos": True, "stop": [free[4:6]]}
    stopped = wait_for_job(live_client, submit(live_client, **body)["id"])
    assert stopped["result"]["finish_reason"] == "stop"

    hit = submit(live_client, **body)

    assert hit["cache_hit"] is True
    assert hit["result"]["finish_reason"] == "stop"
    assert hit["result"]["text"] == stopped["result"]["text"]


def jobs_in_flight(database_url: str, params: dict, followers: int, **leader) -> list[str]:
    """A leader sent to tiny-llama's worker and its followers, stored as the API stores them."""
    new = job_queries.NewJob(
        kind="generate",
        model="tiny-llama",
        queue="llmq.tiny-llama.cpu",
        input={"prompt": f"Tom went home {uuid.uuid4().hex[:8]}"},
        params=params,
        cache_key=uuid.uuid4().hex,
    )
    with session_scope(database_url) as session:
        head = job_queries.create_job(session, replace(new, **leader))
        follower = replace(new, follows_job_id=head.id)
        ids = [head.id] + [job_queries.create_job(session, follower).id for _ in range(followers)]
    enqueue_job(head.id, head.kind, head.queue)
    return [str(job_id) for job_id in ids]


def test_input_error_fails_the_followers_the_same_way(live_client, database_url):
    leader, *followers = jobs_in_flight(database_url, {"max_tokens": 0}, followers=2)

    done = {i: wait_for_job(live_client, i, until=FINAL) for i in (leader, *followers)}

    assert {job["status"] for job in done.values()} == {"failed"}
    assert {job["error"]["category"] for job in done.values()} == {"invalid_input"}
    assert len({job["error"]["message"] for job in done.values()}) == 1
    assert all(stored_job(database_url, i).worker is None for i in followers)
    stream = live_client.get(f"/v1/jobs/{followers[0]}/events").text
    assert "event: error" in stream and "invalid_input" in stream


def test_timed_out_leader_hands_its_followers_a_run(live_client, database_url):
    params = {"max_tokens": 8, "ignore_eos": True}
    leader, first, second = jobs_in_flight(database_url, params, followers=2, timeout_s=0.000001)

    done = {i: wait_for_job(live_client, i, until=FINAL) for i in (leader, first, second)}

    assert done[leader]["error"]["category"] == "timeout"
    assert done[first]["status"] == done[second]["status"] == "succeeded"
    assert done[first]["result"]["text"] == done[second]["result"]["text"]
    heir, other = sorted(
        (stored_job(database_url, i) for i in (first, second)),
        key=lambda job: job.follows_job_id is not None,
    )
    assert heir.follows_job_id is None and heir.worker is not None, "one of them ran"
    assert other.follows_job_id == heir.id and other.worker is None
