"""Completion cache and coalescing queries against a real Postgres: which queued jobs the
reconciler sends, how followers are released, and which results become entries."""

import uuid
from dataclasses import replace

import pytest
from sqlalchemy import select, update

from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import CompletionCache, Job

# Rows only: no worker serves this model, and its jobs are finished after each test.
MODEL = "cache-rows"
OUTCOME = job_queries.Outcome(
    text="It was a sunny day",
    finish_reason="length",
    prompt_tokens=4,
    completion_tokens=5,
    time_to_first_token_ms=1.0,
    duration_ms=5.0,
)


@pytest.fixture(autouse=True)
def finish_leftover_jobs(database_url):
    yield
    with session_scope(database_url) as session:
        session.execute(
            update(Job)
            .where(Job.model == MODEL, Job.status.in_(job_queries.RUNNABLE))
            .values(status="cancelled")
        )


def new_job(**fields) -> job_queries.NewJob:
    fingerprint = {
        "model_revision": "files:test",
        "prompt_hash": uuid.uuid4().hex,
        "params_fingerprint": uuid.uuid4().hex,
    }
    return replace(
        job_queries.NewJob(
            kind="generate",
            model=MODEL,
            queue=f"llmq.{MODEL}.cpu",
            input={"prompt": "x", "fingerprint": fingerprint},
            params={"max_tokens": 4},
            cache_key=uuid.uuid4().hex,
        ),
        **fields,
    )


def test_reconciler_skips_followers_of_a_job_in_flight(database_url):
    with session_scope(database_url) as session:
        leader = job_queries.create_job(session, new_job())
        follower = job_queries.create_job(session, new_job(follows_job_id=leader.id))
        orphan_leader = job_queries.create_job(session, new_job())
        orphan = job_queries.create_job(session, new_job(follows_job_id=orphan_leader.id))
        session.execute(  # a leader that finished without settling its follower
            update(Job).where(Job.id == orphan_leader.id).values(status="succeeded")
        )
        stale = {job.id for job in job_queries.stale_queued(session, 0, 10_000)}

    assert follower.enqueued_at is None
    assert follower.id not in stale, "a follower waits for its leader"
    assert orphan.id in stale, "a follower whose leader is gone must not wait forever"


def test_cancelling_a_leader_promotes_its_oldest_follower(database_url):
    with session_scope(database_url) as session:
        leader = job_queries.create_job(session, new_job())
    with session_scope(database_url) as session:
        heir = job_queries.create_job(session, new_job(follows_job_id=leader.id))
    with session_scope(database_url) as session:
        other = job_queries.create_job(session, new_job(follows_job_id=leader.id))

    with session_scope(database_url) as session:
        assert job_queries.cancel_job(session, leader.id)
    with session_scope(database_url) as session:
        stored = {
            job.id: job
            for job in session.scalars(select(Job).where(Job.id.in_([heir.id, other.id])))
        }

    assert stored[heir.id].follows_job_id is None and stored[heir.id].status == "queued"
    assert stored[other.id].follows_job_id == heir.id


def test_cancelling_a_follower_leaves_its_leader_alone(database_url):
    with session_scope(database_url) as session:
        leader = job_queries.create_job(session, new_job())
        follower = job_queries.create_job(session, new_job(follows_job_id=leader.id))
        assert job_queries.cancel_job(session, follower.id)
        assert session.get(Job, leader.id).status == "queued"


def entries(database_url: str, job: Job) -> list[CompletionCache]:
    with session_scope(database_url) as session:
        return list(
            session.scalars(
                select(CompletionCache).where(
                    CompletionCache.prompt_hash == job.input["fingerprint"]["prompt_hash"]
                )
            )
        )


def test_only_finished_texts_become_entries_and_newer_ones_replace_older(database_url):
    with session_scope(database_url) as session:
        job = job_queries.create_job(session, new_job())
        cancelled = replace(OUTCOME, finish_reason="cancelled")
        assert not cache_queries.store_entry(session, job, cancelled)
        assert cache_queries.store_entry(session, job, OUTCOME)
    with session_scope(database_url) as session:
        assert cache_queries.store_entry(session, job, replace(OUTCOME, text="Another day"))

    (entry,) = entries(database_url, job)
    assert entry.text == "Another day" and entry.finish_reason == "length"


def test_job_without_cache_key_writes_no_entry(database_url):
    with session_scope(database_url) as session:
        job = job_queries.create_job(session, new_job(cache_key=None))
        assert not cache_queries.store_entry(session, job, OUTCOME)
    assert entries(database_url, job) == []


def test_urgent_job_does_not_follow_one_queued_at_lower_priority(database_url):
    with session_scope(database_url) as session:
        batch_line = job_queries.create_job(session, new_job(priority=9))
        key = batch_line.cache_key
        assert cache_queries.find_leader(session, key, priority=0) is None
        assert cache_queries.find_leader(session, key, priority=9) == batch_line.id
        session.execute(update(Job).where(Job.id == batch_line.id).values(status="running"))
        assert cache_queries.find_leader(session, key, priority=0) == batch_line.id
