"""The result writer: results waiting together commit in one transaction, each caller gets its
own job's answer, and a result Postgres refuses fails alone."""

import threading
import time
import uuid

import pytest
from sqlalchemy import event, select, update

from db.queries import jobs as job_queries
from db.session import get_engine, session_scope
from db.tables import Job, JobResult
from workers.result_writer import ResultWriter

MODEL = "writer-model"
WORKER = "writer-test@host"
OTHER_WORKER = "another-worker@host"


@pytest.fixture(autouse=True)
def workers_seem_alive():
    """Heartbeats in the names of the workers these jobs run on, from Celery's own heartbeat
    service as a worker runs it (workers/draining.py does the same): an API process the session
    runs would otherwise take them for lost after a few silent seconds (its reconciler) and put
    their jobs back in the queue under the test's feet."""
    from celery.utils.timer2 import Timer
    from celery.worker.heartbeat import Heart

    from workers.app import app

    timer = Timer()
    with app.connection_for_write() as connection:
        hearts = [
            Heart(timer, app.events.Dispatcher(connection, hostname=name, enabled=True), 1.0)
            for name in (WORKER, OTHER_WORKER)
        ]
        for heart in hearts:
            heart.start()
        yield
        for heart in hearts:
            heart.stop()
    timer.stop()


def running_job(
    database_url,
    worker: str = WORKER,
    follows: uuid.UUID | None = None,
    cache_key: str | None = None,
) -> uuid.UUID:
    new = job_queries.NewJob(
        kind="generate",
        model=MODEL,
        queue=f"llmq.{MODEL}.cpu",
        input={"prompt": "x"},
        params={"max_tokens": 4},
        follows_job_id=follows,
        cache_key=cache_key,
    )
    with session_scope(database_url) as session:
        job = job_queries.create_job(session, new)
        if follows is None:
            job.status, job.worker = "running", worker
        return job.id


def outcome(text: str) -> job_queries.Outcome:
    return job_queries.Outcome(text, "length", 3, 4, 1.5, 20.0)


def store_all(writer: ResultWriter, results: dict[uuid.UUID, str]) -> dict[uuid.UUID, object]:
    """Every result queued before the writer starts, so that it finds them all waiting."""
    answers: dict[uuid.UUID, object] = {}

    def store(job_id: uuid.UUID, text: str) -> None:
        try:
            answers[job_id] = writer.store(job_id, outcome(text))
        except Exception as exc:
            answers[job_id] = exc

    threads = [threading.Thread(target=store, args=item) for item in results.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while writer._inbox.qsize() < len(results):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.start()
    for thread in threads:
        thread.join(30)
    writer.stop()
    return answers


@pytest.fixture
def commits(database_url):
    engine = get_engine(database_url)
    count = [0]

    def counted(connection):  # the writer's own: other tests' services may commit meanwhile
        if threading.current_thread().name == "llmq-results":
            count[0] += 1

    event.listen(engine, "commit", counted)
    yield count
    event.remove(engine, "commit", counted)


@pytest.fixture
def statements(database_url):
    engine = get_engine(database_url)
    count = [0]

    def counted(*_args):
        if threading.current_thread().name == "llmq-results":
            count[0] += 1

    event.listen(engine, "before_cursor_execute", counted)
    yield count
    event.remove(engine, "before_cursor_execute", counted)


def test_results_waiting_together_commit_once_and_each_caller_gets_its_own(database_url, commits):
    ours = [running_job(database_url, cache_key=f"key-{uuid.uuid4()}")]
    ours += [running_job(database_url) for _ in range(11)]
    follower = running_job(database_url, follows=ours[0])
    theirs = running_job(database_url, worker=OTHER_WORKER)
    texts = {job_id: f"text {i}" for i, job_id in enumerate([*ours, theirs])}

    answers = store_all(ResultWriter(database_url, WORKER), texts)

    assert commits[0] == 1
    assert answers[theirs] is None  # not this worker's job: nothing written
    assert answers[ours[0]].followers == [follower]
    assert all(answers[job_id].followers == [] for job_id in ours[1:])
    with session_scope(database_url) as session:
        for job_id in ours:
            assert session.get(Job, job_id).status == "succeeded"
            assert session.get(JobResult, job_id).text == texts[job_id]
        assert session.get(JobResult, follower).text == texts[ours[0]]
        assert session.get(Job, theirs).status == "running"
        assert session.get(JobResult, theirs) is None


def test_a_group_costs_the_same_statements_however_many_jobs_it_holds(database_url, statements):
    """Jobs without a cache key can have no followers: no lookup is spent on them."""
    counts = []
    for size in (1, 20):
        statements[0] = 0
        texts = {running_job(database_url): f"text {i}" for i in range(size)}
        answers = store_all(ResultWriter(database_url, WORKER), texts)
        assert all(answers[job_id].job.id == job_id for job_id in texts)
        counts.append(statements[0])
    assert counts[0] == counts[1] <= 4  # the ping, the update and two inserts


def test_a_result_postgres_refuses_fails_alone(database_url):
    good = [running_job(database_url) for _ in range(3)]
    bad = running_job(database_url)
    texts = {good[0]: "fine", bad: "a NUL \x00 Postgres text cannot hold"}
    texts |= {job_id: "also fine" for job_id in good[1:]}

    answers = store_all(ResultWriter(database_url, WORKER), texts)

    assert isinstance(answers[bad], Exception)
    with session_scope(database_url) as session:
        assert session.get(Job, bad).status == "running"  # the runner then stores a failure
        for job_id in good:
            assert answers[job_id].job.id == job_id
            assert session.get(JobResult, job_id).text == texts[job_id]
        session.execute(update(Job).where(Job.id == bad).values(status="failed"))


def cacheable_job(database_url) -> uuid.UUID:
    pieces = {
        "model_revision": "files:test",
        "prompt_hash": uuid.uuid4().hex,
        "params_fingerprint": uuid.uuid4().hex,
    }
    job_id = running_job(database_url, cache_key=f"key-{uuid.uuid4()}")
    with session_scope(database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(input={"prompt": "x", "fingerprint": pieces})
        )
    return job_id


def test_no_cache_entry_is_kept_while_new_weights_wait_for_a_reload(database_url):
    from db.tables import CompletionCache

    fresh, stale = cacheable_job(database_url), cacheable_job(database_url)
    store_all(ResultWriter(database_url, WORKER, weights_current=lambda: True), {fresh: "new"})
    store_all(ResultWriter(database_url, WORKER, weights_current=lambda: False), {stale: "old"})
    with session_scope(database_url) as session:
        texts = {
            job_id: session.scalars(
                select(CompletionCache.text).where(
                    CompletionCache.prompt_hash
                    == session.get(Job, job_id).input["fingerprint"]["prompt_hash"]
                )
            ).one_or_none()
            for job_id in (fresh, stale)
        }
        results = session.scalars(
            select(JobResult.text).where(JobResult.job_id.in_([fresh, stale]))
        ).all()
    assert texts == {fresh: "new", stale: None}
    assert sorted(results) == ["new", "old"]  # the results are stored all the same
