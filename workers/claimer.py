"""Claiming generation jobs many per transaction: the messages of a micro-batch arrive
together, and each Celery thread wanted a transaction of its own (llmq/group_commit.py)."""

import uuid
from functools import partial

from sqlalchemy import Row

from db.queries import jobs as job_queries
from db.session import session_scope
from llmq.group_commit import GroupCommit
from workers.db_retry import db_retry


class JobClaimer(GroupCommit[uuid.UUID, "Row | None"]):
    def __init__(self, database_url: str, worker_name: str) -> None:
        super().__init__("llmq-claims", partial(claim_group, database_url, worker_name))

    def claim(self, job_id: uuid.UUID) -> Row | None:
        """The job, now running for this worker; None if it was not queued (another worker
        holds it, or it was cancelled or has finished)."""
        return self.submit(job_id)

    def claim_all(self, job_ids: list[uuid.UUID]) -> list[Row]:
        """Those of the jobs that were queued, now running for this worker."""
        claims = [self.submit_async(job_id) for job_id in job_ids]
        return [job for claim in claims if (job := claim.result()) is not None]


@db_retry
def claim_group(database_url: str, worker_name: str, job_ids: list[uuid.UUID]) -> list[Row | None]:
    with session_scope(database_url) as session:
        claimed = {row.id: row for row in job_queries.claim_jobs(session, job_ids, worker_name)}
    return [claimed.pop(job_id, None) for job_id in job_ids]  # a duplicate delivery gets None
