"""Concurrent requests' jobs stored in one transaction (api/intake/store_groups.py), against the
real Postgres: requests that wait together share one INSERT and one COMMIT (their rows carry one
transaction id), a key's limit counts the jobs admitted before it in the same transaction, a
request Postgres refuses fails alone, and a cancelled request's jobs are stored all the same.

Each scenario holds the jobs table locked while the first request's group waits on it, so that
the requests after it are queued behind and go in one group, as under load."""

import asyncio
import uuid

import psycopg
import pytest
from sqlalchemy.engine import make_url

from api.http.limits import KeyLimits
from api.intake.store_groups import StoreGroups
from api.intake.submit import GenerationRequest, Placement
from llmq.errors import TooManyConcurrentJobs
from llmq.protocol import SamplingParams

# A model no test worker serves: the jobs stay queued, and no other test runs them.
MODEL = "tiny-offline"
NO_LIMITS = KeyLimits()


@pytest.fixture
def groups(app, database_url):
    store = StoreGroups(database_url, app.state.prompt_counter, app.state.live_queues)
    store.start()
    yield store
    store.stop()


@pytest.fixture
def postgres(database_url):
    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(url, autocommit=True) as connection:
        yield connection


def job_requests(app, *prompts: str, owner: str | None = None) -> list[GenerationRequest]:
    spec = app.state.registry.get(MODEL)
    params = SamplingParams(max_tokens=1)
    return [
        GenerationRequest(spec=spec, prompt=p, params=params, owner=owner, use_cache=False)
        for p in prompts
    ]


async def behind_a_locked_table(postgres, groups, first, others):
    """Store `first`, whose group then waits for the jobs table, queue `others` behind it, then
    unlock the table; each request's submissions or error, in order."""
    postgres.execute("BEGIN")
    postgres.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")  # INSERTs wait, reads do not
    try:
        leading = asyncio.create_task(groups.store(*first))
        await asyncio.sleep(0.3)  # the thread has taken it and waits on the lock
        queued = [asyncio.create_task(groups.store(*request)) for request in others]
        await asyncio.sleep(0.3)
    finally:
        postgres.execute("COMMIT")
    return await asyncio.gather(leading, *queued, return_exceptions=True)


def transaction_ids(postgres, job_ids) -> list[str]:
    rows = postgres.execute("SELECT id, xmin::text FROM jobs WHERE id = ANY(%s)", [job_ids])
    by_id = dict(rows.fetchall())
    return [by_id.get(job_id) for job_id in job_ids]


def test_requests_that_wait_together_share_one_transaction(app, groups, postgres):
    first = (job_requests(app, "lead"), None, NO_LIMITS)
    others = [(job_requests(app, f"p{i}", f"q{i}"), None, NO_LIMITS) for i in range(6)]
    answers = asyncio.run(behind_a_locked_table(postgres, groups, first, others))

    assert not [a for a in answers if isinstance(a, BaseException)], answers
    led, *followed = answers
    # Every job is stored, in its request's order, queued for its model.
    for submissions, (requests, _, _) in zip(followed, others, strict=True):
        assert [s.job.input["prompt"] for s in submissions] == [r.prompt for r in requests]
        assert all(s.created and s.placement is Placement.QUEUED for s in submissions)
    job_ids = [s.job.id for answer in followed for s in answer]
    # One transaction for the six requests behind the first, and not the first's.
    (behind,) = set(transaction_ids(postgres, job_ids))
    assert behind is not None
    assert transaction_ids(postgres, [led[0].job.id]) != [behind]


def test_a_keys_limit_counts_its_jobs_earlier_in_the_same_transaction(app, groups, postgres):
    owner = f"key-{uuid.uuid4().hex[:8]}"
    limited = KeyLimits(max_concurrent_jobs=2)
    first = (job_requests(app, "someone else's"), None, NO_LIMITS)
    others = [
        (job_requests(app, "one", owner=owner), owner, limited),
        (job_requests(app, "two", owner=owner), owner, limited),
        (job_requests(app, "three", owner=owner), owner, limited),  # a third in flight: refused
        (job_requests(app, "another key's"), None, NO_LIMITS),
    ]
    _, one, two, three, unlimited = asyncio.run(
        behind_a_locked_table(postgres, groups, first, others)
    )

    assert isinstance(three, TooManyConcurrentJobs), three
    assert "has 2 jobs queued or running and may have 2 at once" in three.message
    stored = [one[0].job.id, two[0].job.id, unlimited[0].job.id]
    assert len(set(transaction_ids(postgres, stored))) == 1
    prompts = postgres.execute("SELECT input->>'prompt' FROM jobs WHERE owner = %s", [owner])
    assert sorted(row[0] for row in prompts) == ["one", "two"]


def test_a_request_postgres_refuses_fails_alone(app, groups, postgres):
    # Past an integer column's range: valid to the API's models, refused by Postgres.
    spec = app.state.registry.get(MODEL)
    refused = GenerationRequest(
        spec=spec, prompt="too late", params=SamplingParams(max_tokens=1), priority=2**40
    )
    first = (job_requests(app, "lead"), None, NO_LIMITS)
    others = [
        (job_requests(app, "before"), None, NO_LIMITS),
        ([refused], None, NO_LIMITS),
        (job_requests(app, "after"), None, NO_LIMITS),
    ]
    _, before, error, after = asyncio.run(behind_a_locked_table(postgres, groups, first, others))

    assert isinstance(error, Exception) and "out of range" in str(error), error
    assert [s.job.input["prompt"] for s in before + after] == ["before", "after"]
    assert None not in transaction_ids(postgres, [before[0].job.id, after[0].job.id])
    found = postgres.execute("SELECT count(*) FROM jobs WHERE input->>'prompt' = 'too late'")
    assert found.fetchone()[0] == 0


def test_a_cancelled_requests_jobs_are_stored_all_the_same(app, groups, postgres):
    prompt = f"gone {uuid.uuid4().hex[:8]}"

    async def scenario():
        postgres.execute("BEGIN")
        postgres.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
        request = asyncio.create_task(groups.store(job_requests(app, prompt), None, NO_LIMITS))
        await asyncio.sleep(0.3)
        request.cancel()  # the client went away while its jobs waited
        postgres.execute("COMMIT")
        with pytest.raises(asyncio.CancelledError):
            await request
        # The next request is answered: the thread went on.
        return await asyncio.wait_for(groups.store(job_requests(app, "next"), None, NO_LIMITS), 30)

    (next_submission,) = asyncio.run(scenario())
    assert next_submission.job.input["prompt"] == "next"
    found = postgres.execute("SELECT status FROM jobs WHERE input->>'prompt' = %s", [prompt])
    assert [row[0] for row in found] == ["queued"]
