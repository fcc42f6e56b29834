"""`llmq.score_group`: several scoring jobs in one message, run by a real worker. Each job
still ends on its own: a good one is stored, a bad one fails alone, a cancelled one is skipped,
and the group's scores equal those of the same jobs sent one by one."""

import time
import uuid

from sqlalchemy import select

from api.intake.enqueue import enqueue_job, enqueue_score_group
from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import Job, ScoreResult
from llmq.protocol import BATCH_PRIORITY, JobKind, JobStatus
from tests.evals.conftest import EVAL_MODEL, EVAL_QUEUE

PROMPT = "Question: which animal barks?\nAnswer:"
GOOD = {"prompt": PROMPT, "continuations": [" A", " B", " C", " D"]}
# An empty continuation has no token to score: the engine rejects that job alone.
BAD = {"prompt": PROMPT, "continuations": [""]}


def create(database_url, given: dict, status: JobStatus = JobStatus.QUEUED) -> uuid.UUID:
    with session_scope(database_url) as session:
        job = job_queries.create_job(
            session,
            job_queries.NewJob(
                kind=JobKind.SCORE.value,
                model=EVAL_MODEL,
                queue=EVAL_QUEUE,
                input=given,
                params={"max_length": 512},
                priority=BATCH_PRIORITY,
            ),
        )
        job.status = status.value
        return job.id


def wait_ended(database_url, job_ids: list[uuid.UUID], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    final = {s.value for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)}
    while True:
        with session_scope(database_url) as session:
            rows = session.execute(select(Job).where(Job.id.in_(job_ids))).scalars().all()
            jobs = {job.id: (job.status, job.error_category, job.attempts) for job in rows}
        if all(status in final for status, _, _ in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)


def loglikelihoods(database_url, job_id: uuid.UUID) -> list[float]:
    with session_scope(database_url) as session:
        return session.scalars(
            select(ScoreResult.loglikelihoods).where(ScoreResult.job_id == job_id)
        ).one()


def test_a_group_ends_each_job_on_its_own(database_url, eval_worker):
    good = [create(database_url, GOOD) for _ in range(3)]
    bad = create(database_url, BAD)
    cancelled = create(database_url, GOOD, JobStatus.CANCELLED)
    assert enqueue_score_group([*good, bad, cancelled], EVAL_QUEUE, BATCH_PRIORITY)
    jobs = wait_ended(database_url, [*good, bad, cancelled])

    assert [jobs[job_id][0] for job_id in good] == [JobStatus.SUCCEEDED.value] * 3
    assert jobs[bad][:2] == (JobStatus.FAILED.value, "invalid_input")
    assert jobs[cancelled] == (JobStatus.CANCELLED.value, None, 0)  # never claimed

    alone = create(database_url, GOOD)
    assert enqueue_job(alone, JobKind.SCORE.value, EVAL_QUEUE, BATCH_PRIORITY)
    assert wait_ended(database_url, [alone])[alone][0] == JobStatus.SUCCEEDED.value
    expected = loglikelihoods(database_url, alone)
    for job_id in good:
        assert loglikelihoods(database_url, job_id) == expected


def test_a_group_delivered_twice_runs_each_job_once(database_url, eval_worker):
    jobs = [create(database_url, GOOD) for _ in range(2)]
    assert enqueue_score_group(jobs, EVAL_QUEUE, BATCH_PRIORITY)
    wait_ended(database_url, jobs)
    # The same message again, with one new job: once that job has ended, the whole second
    # delivery has been handled (a group's claim comes before any of its jobs ends).
    fresh = create(database_url, GOOD)
    assert enqueue_score_group([*jobs, fresh], EVAL_QUEUE, BATCH_PRIORITY)
    ended = wait_ended(database_url, [*jobs, fresh])
    assert [ended[job_id] for job_id in [*jobs, fresh]] == [
        (JobStatus.SUCCEEDED.value, None, 1)
    ] * 3
