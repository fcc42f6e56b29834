"""Batches of the Batch API and their lines. A batch's progress is read from its jobs."""

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from db.queries.jobs import release_followers
from db.tables import Batch, BatchLine, Job
from llmq.protocol import JobStatus


class BatchStatus:
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    ENDED = (COMPLETED, FAILED, EXPIRED, CANCELLED)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


def create_batch(session: Session, **fields) -> Batch:
    batch = Batch(id=new_batch_id(), status=BatchStatus.VALIDATING, total=0, **fields)
    session.add(batch)
    session.flush()
    return batch


def get_batch(
    session: Session, batch_id: str, owner: str | None, admin: bool = False
) -> Batch | None:
    stmt = select(Batch).where(Batch.id == batch_id)
    if not admin:
        stmt = stmt.where(Batch.owner.is_not_distinct_from(owner))
    return session.scalars(stmt).first()


def list_batches(
    session: Session, owner: str | None, admin: bool, after: str | None, limit: int
) -> list[Batch]:
    """Newest first; `after` is the id of the last batch of the previous page."""
    stmt = select(Batch)
    if not admin:
        stmt = stmt.where(Batch.owner.is_not_distinct_from(owner))
    if after is not None:
        anchor = session.scalar(select(Batch.created_at).where(Batch.id == after))
        if anchor is not None:
            stmt = stmt.where(
                (Batch.created_at < anchor) | ((Batch.created_at == anchor) & (Batch.id < after))
            )
    return list(
        session.scalars(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit))
    )


def batches_with_status(session: Session, *statuses: str) -> list[str]:
    return list(session.scalars(select(Batch.id).where(Batch.status.in_(statuses))))


def lock_batch(session: Session, batch_id: str, *statuses: str) -> Batch | None:
    """The batch, locked for this transaction, if it is in one of `statuses` and no other
    process holds it (each batch is driven by one API process at a time)."""
    return session.scalars(
        select(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(statuses))
        # NO KEY UPDATE: lines inserted meanwhile (by another connection) reference the row.
        .with_for_update(skip_locked=True, key_share=True)
    ).first()


def set_status(session: Session, batch_id: str, status: str, **fields) -> None:
    stamp = {f"{status}_at": func.now()} if hasattr(Batch, f"{status}_at") else {}
    session.execute(
        update(Batch).where(Batch.id == batch_id).values(status=status, **stamp, **fields)
    )


def line_count(session: Session, batch_id: str) -> int:
    return session.scalar(
        select(func.count()).select_from(BatchLine).where(BatchLine.batch_id == batch_id)
    )


def submitted_lines(session: Session, batch_id: str) -> set[int]:
    return set(session.scalars(select(BatchLine.line).where(BatchLine.batch_id == batch_id)))


def add_lines(session: Session, batch_id: str, rows: list[tuple]) -> None:
    """Many lines in one statement: (line, custom_id, url, body, job_ids) each."""
    if rows:
        session.execute(
            insert(BatchLine.__table__),
            [
                {
                    "batch_id": batch_id,
                    "line": line,
                    "custom_id": custom_id,
                    "url": url,
                    "body": body,
                    "job_ids": [str(job_id) for job_id in job_ids],
                }
                for line, custom_id, url, body, job_ids in rows
            ],
        )


def lines(session: Session, batch_id: str) -> list[BatchLine]:
    return list(
        session.scalars(
            select(BatchLine).where(BatchLine.batch_id == batch_id).order_by(BatchLine.line)
        )
    )


@dataclass(frozen=True)
class JobCounts:
    open: int  # queued or running
    by_status: dict[str, int]


def job_counts(session: Session, batch_id: str) -> JobCounts:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    ).all()
    by_status = {status: count for status, count in rows}
    open_jobs = by_status.get(JobStatus.QUEUED.value, 0) + by_status.get(JobStatus.RUNNING.value, 0)
    return JobCounts(open_jobs, by_status)


def open_batch_jobs(session: Session) -> dict[tuple[str, str], int]:
    """Batch-API jobs queued or running over every batch, per (model, status)."""
    rows = session.execute(
        select(Job.model, Job.status, func.count())
        .where(
            Job.batch_id.is_not(None),
            Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)),
        )
        .group_by(Job.model, Job.status)
    ).all()
    return {(model, status): count for model, status, count in rows}


def batches_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Batch.status, func.count()).group_by(Batch.status)).all()
    return {status: count for status, count in rows}


def jobs_of(session: Session, batch_id: str) -> dict[str, Job]:
    jobs = session.scalars(select(Job).where(Job.batch_id == batch_id))
    return {str(job.id): job for job in jobs}


def cancel_open_jobs(session: Session, batch_id: str, statuses: tuple[str, ...]) -> int:
    """Cancel the batch's jobs in `statuses`; identical jobs of others that were waiting on one
    of them get a run of their own."""
    cancelled = session.scalars(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status.in_(statuses))
        .values(status=JobStatus.CANCELLED.value, finished_at=func.now())
        .returning(Job.id)
    ).all()
    for job_id in cancelled:
        release_followers(session, job_id)
    return len(cancelled)


def expired(batch: Batch, now: datetime) -> bool:
    return batch.expires_at <= now


def line_outcomes(session: Session, batch_id: str) -> tuple[int, int]:
    """(completed, failed) lines so far: completed when all its jobs succeeded, failed when
    one failed or was cancelled, or the line was refused."""
    statuses = dict(
        session.execute(select(Job.id, Job.status).where(Job.batch_id == batch_id)).all()
    )
    completed = failed = 0
    rows = session.execute(
        select(BatchLine.job_ids).where(BatchLine.batch_id == batch_id)
    ).scalars()
    ended_badly = {JobStatus.FAILED.value, JobStatus.CANCELLED.value}
    for job_ids in rows:
        line = [statuses.get(uuid.UUID(job_id)) for job_id in job_ids]
        if not line or any(status in ended_badly for status in line):
            failed += 1
        elif all(status == JobStatus.SUCCEEDED.value for status in line):
            completed += 1
    return completed, failed
