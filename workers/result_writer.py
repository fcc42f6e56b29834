"""Finished generation jobs' results go to Postgres many per transaction (a group commit: see
llmq/group_commit.py), in a fixed number of statements per group. Their usage rows are
priced as they are written: at the price in force when the job finished."""

import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.session import session_scope
from llmq.group_commit import GroupCommit
from llmq.price_book import get_price_book
from workers.db_retry import db_retry

Result = tuple[uuid.UUID, job_queries.Outcome]


@dataclass(frozen=True)
class Stored:
    job: job_queries.Completed
    followers: list[uuid.UUID]  # jobs that waited on this one's result, now completed with it


class ResultWriter(GroupCommit[Result, "Stored | None"]):
    def __init__(
        self,
        database_url: str,
        worker_name: str,
        price_of: job_queries.PriceOf | None = None,
        weights_current: Callable[[], bool] | None = None,
    ) -> None:
        """`weights_current`: whether the weights that produced the results are still the
        model's (not new files waiting for a reload); when not, no cache entry is kept."""
        price_of = price_of or get_price_book().price
        current = weights_current or (lambda: True)
        write = partial(store_results, database_url, worker_name, price_of, current)
        super().__init__("llmq-results", write)

    def store(self, job_id: uuid.UUID, outcome: job_queries.Outcome) -> Stored | None:
        """Store the job's result, its cache entry and its followers' results; blocks until
        they are committed. None if the job was not this worker's to complete (cancelled, or
        handed to another worker); raises what storing it alone raised."""
        return self.submit((job_id, outcome))

    def store_async(
        self, job_id: uuid.UUID, outcome: job_queries.Outcome
    ) -> "Future[Stored | None]":
        """`store` without waiting: the answer once committed."""
        return self.submit_async((job_id, outcome))


@db_retry
def store_results(
    database_url: str,
    worker_name: str,
    price_of: job_queries.PriceOf,
    weights_current: Callable[[], bool],
    results: list[Result],
) -> list[Stored | None]:
    """The jobs' results, cache entries and followers' results in one transaction; None for a
    job that was not this worker's to complete."""
    keep_entries = weights_current()  # once a transaction: it may look at the model's files
    with session_scope(database_url) as session:
        done = job_queries.complete_jobs(session, worker_name, dict(results), price_of=price_of)
        stored: list[Stored | None] = []
        for job_id, outcome in results:
            job = done.pop(job_id, None)  # popped: a job listed twice is stored once
            if job is None:
                stored.append(None)
            elif job.cache_key is None:  # only a job with a cache key can have followers
                stored.append(Stored(job, []))
            else:
                if keep_entries:
                    cache_queries.store_entry(session, job, outcome)
                followers = cache_queries.complete_followers(
                    session, job, outcome, price_of=price_of
                )
                stored.append(Stored(job, followers))
    return stored
