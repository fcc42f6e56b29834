"""Jobs committed together travel together: one broker message per kind, queue and priority
(at most MAX_JOBS_PER_MESSAGE jobs), which the reconciler still reads job by job, and a real
worker runs each job of a group to its own end."""

import json
import time
import uuid

from redis import Redis
from sqlalchemy import select

from api.background.reconciler import waiting_job_ids
from api.fleet.live_workers import task_job_ids
from api.fleet.queues import priority_lists
from api.intake.enqueue import MAX_JOBS_PER_MESSAGE, _Sender, send_jobs
from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import Job, JobResult
from llmq.protocol import GENERATE_GROUP_TASK, GENERATE_TASK, JOB_IDS_HEADER, JobStatus

QUEUE = "llmq.tiny-llama.cpu"


def create(database_url, prompt: str, max_tokens: int = 4, queue: str = QUEUE) -> uuid.UUID:
    with session_scope(database_url) as session:
        job = job_queries.insert_job(
            session,
            job_queries.NewJob(
                kind="generate",
                model="tiny-llama",
                queue=queue,
                input={"prompt": prompt},
                params={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
            ),
        )
        return job.id


def delivery(job_id: uuid.UUID, queue: str, priority: int = 0) -> job_queries.Delivery:
    return job_queries.Delivery(job_id, "generate", queue, priority)


def test_jobs_sent_together_share_messages_the_reconciler_reads_job_by_job(redis_url):
    queue = f"llmq.nobody-{uuid.uuid4().hex[:8]}.cpu"  # no worker consumes it
    job_ids = [uuid.uuid4() for _ in range(MAX_JOBS_PER_MESSAGE + 6)]
    late = uuid.uuid4()
    sent = send_jobs([delivery(j, queue) for j in job_ids] + [delivery(late, queue, priority=9)])
    redis = Redis.from_url(redis_url)
    lowest = priority_lists(queue)[-1]
    try:
        assert set(sent) == {*job_ids, late}
        messages = [json.loads(raw) for raw in redis.lrange(queue, 0, -1)]
        sizes = sorted(len(m["headers"][JOB_IDS_HEADER]) for m in messages)
        assert sizes == [6] + [MAX_JOBS_PER_MESSAGE] * (len(messages) - 1)
        assert {m["headers"]["task"] for m in messages} == {GENERATE_GROUP_TASK}
        alone = [json.loads(raw) for raw in redis.lrange(lowest, 0, -1)]
        assert [(m["headers"]["task"], m["headers"]["id"]) for m in alone] == [
            (GENERATE_TASK, str(late))
        ]
        assert waiting_job_ids(redis, {queue}) == {str(j) for j in [*job_ids, late]}
    finally:
        redis.delete(*priority_lists(queue))


def test_an_active_group_task_names_each_of_its_jobs():
    jobs = [str(uuid.uuid4()) for _ in range(3)]
    group = {"id": "message-id", "args": [{"job_ids": jobs}]}
    single = {"id": jobs[0], "args": [{"job_id": jobs[0]}]}
    assert task_job_ids(group) == jobs
    assert task_job_ids(single) == [jobs[0]]


def test_a_worker_runs_each_job_of_a_group_to_its_own_end(database_url, worker):
    short = [create(database_url, f"Once upon a time {i}", max_tokens=2) for i in range(5)]
    long = create(database_url, "A long story", max_tokens=24)
    cancelled = create(database_url, "never runs")
    with session_scope(database_url) as session:
        session.execute(
            job_queries.job_table.update()
            .where(job_queries.job_table.c.id == cancelled)
            .values(status=JobStatus.CANCELLED.value)
        )
    assert len(send_jobs([delivery(j, QUEUE) for j in [long, *short, cancelled]])) == 7

    deadline = time.monotonic() + 60
    while True:
        with session_scope(database_url) as session:
            rows = session.execute(
                select(Job.id, Job.status, Job.finished_at, JobResult.completion_tokens)
                .outerjoin(JobResult)
                .where(Job.id.in_([long, *short, cancelled]))
            ).all()
        ended = {row.id: row for row in rows if row.status != "queued" and row.status != "running"}
        if len(ended) == 7:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    assert ended[cancelled].status == "cancelled"
    assert all(ended[j].status == "succeeded" for j in [long, *short])
    assert ended[long].completion_tokens == 24
    # Each job is stored as soon as it finishes, not when the group's last one does.
    assert max(ended[j].finished_at for j in short) < ended[long].finished_at


def _jobs_per_message(redis: Redis, queue: str) -> list[int]:
    headers = [json.loads(raw)["headers"] for raw in redis.lrange(queue, 0, -1)]
    return [len(h.get(JOB_IDS_HEADER, [h["id"]])) for h in headers]


def test_a_burst_of_jobs_waits_for_its_last_job_and_a_lone_job_goes_at_once(redis_url):
    """Jobs that keep arriving within the sender's gap of each other go in one message; a job
    that arrives alone is sent without waiting."""
    queue = f"llmq.nobody-{uuid.uuid4().hex[:8]}.cpu"
    redis = Redis.from_url(redis_url)
    sender = _Sender(linger_s=5.0, gap_s=1.0)
    try:
        # The burst's first two jobs wait before the sender starts, so it finds more than one
        # (a job it finds alone goes at once, whatever follows it).
        sender.put(delivery(uuid.uuid4(), queue))
        sender.put(delivery(uuid.uuid4(), queue))
        sender.start()
        for _ in range(3):  # the rest of the burst, each well within the gap of the last
            time.sleep(0.05)
            for _ in range(2):
                sender.put(delivery(uuid.uuid4(), queue))
        deadline = time.monotonic() + 10
        while sum(_jobs_per_message(redis, queue)) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _jobs_per_message(redis, queue) == [8]

        redis.delete(queue)
        time.sleep(0.5)  # the burst is long over
        started = time.monotonic()
        sender.put(delivery(uuid.uuid4(), queue))
        while not redis.exists(queue) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _jobs_per_message(redis, queue) == [1]
        assert time.monotonic() - started < 0.5  # it did not wait out a gap
    finally:
        redis.delete(*priority_lists(queue))
