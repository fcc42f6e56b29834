"""Finished generation jobs' results go to Postgres many per transaction (group commit).

The jobs of a micro-batch often finish at the same decode step, and each Celery thread then
wanted a transaction of its own, one after another. One writer thread takes every result that
is waiting and commits them together; each waiting thread gets its own job's answer. A result
that breaks the shared transaction is written again alone, so it fails alone.
"""

import queue
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog

from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import Job
from workers.db_retry import db_retry

log = structlog.get_logger(__name__)

# Results per transaction: bounds a transaction's length when thousands end at once.
MAX_RESULTS_PER_COMMIT = 256


@dataclass(frozen=True)
class Stored:
    job: Job
    followers: list[uuid.UUID]  # jobs that waited on this one's result, now completed with it


@dataclass
class _Result:
    job_id: uuid.UUID
    outcome: job_queries.Outcome
    future: Future = field(default_factory=Future)


class ResultWriter:
    def __init__(self, database_url: str, worker_name: str) -> None:
        self.database_url = database_url
        self.worker_name = worker_name
        self._inbox: queue.Queue[_Result | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="llmq-results", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Writes what is waiting, then ends."""
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def store(self, job_id: uuid.UUID, outcome: job_queries.Outcome) -> Stored | None:
        """Store the job's result, its cache entry and its followers' results; blocks until
        they are committed. None if the job was not this worker's to complete (cancelled, or
        handed to another worker); raises what storing it alone raised."""
        if self._stopped.is_set():
            raise RuntimeError("the result writer has stopped")
        result = _Result(job_id, outcome)
        self._inbox.put(result)
        return result.future.result()

    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            results = [first]
            while len(results) < MAX_RESULTS_PER_COMMIT:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)  # end after this group
                    break
                results.append(more)
            self._write(results)

    def _write(self, results: list[_Result]) -> None:
        try:
            stored = store_results(
                self.database_url, self.worker_name, [(r.job_id, r.outcome) for r in results]
            )
        except Exception as exc:
            if len(results) == 1:
                results[0].future.set_exception(exc)
            else:
                log.warning("a group of results failed to commit; storing each alone")
                for result in results:
                    self._write([result])
            return
        for result, outcome in zip(results, stored, strict=True):
            result.future.set_result(outcome)


@db_retry
def store_results(
    database_url: str, worker_name: str, results: list[tuple[uuid.UUID, job_queries.Outcome]]
) -> list[Stored | None]:
    """The jobs' results, cache entries and followers' results in one transaction; None for a
    job that was not this worker's to complete."""
    stored: list[Stored | None] = []
    with session_scope(database_url) as session:
        for job_id, outcome in results:
            job = job_queries.complete_job(session, job_id, worker_name, outcome)
            if job is None:
                stored.append(None)
                continue
            cache_queries.store_entry(session, job, outcome)
            followers = cache_queries.complete_followers(session, job, outcome)
            stored.append(Stored(job, followers))
    return stored
