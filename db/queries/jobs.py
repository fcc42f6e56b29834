"""Job queries. Every status change is a compare-and-set, so duplicate deliveries write once."""

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.tables import Job, JobResult, Usage
from llmq.protocol import ErrorCategory, JobStatus

RUNNABLE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class NewJob:
    kind: str
    model: str
    queue: str
    input: dict[str, Any]
    params: dict[str, Any]
    owner: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    duration_ms: float


def find_by_idempotency_key(session: Session, owner: str | None, key: str) -> Job | None:
    stmt = select(Job).where(Job.idempotency_key == key)
    stmt = stmt.where(Job.owner.is_(None) if owner is None else Job.owner == owner)
    return session.scalars(stmt).first()


def create_job(session: Session, new: NewJob) -> Job:
    job = Job(
        id=uuid.uuid4(),
        kind=new.kind,
        model=new.model,
        queue=new.queue,
        status=JobStatus.QUEUED.value,
        enqueued_at=func.now(),  # the send follows the commit; the reconciler covers a failure
        input=new.input,
        params=new.params,
        owner=new.owner,
        idempotency_key=new.idempotency_key,
        request_id=new.request_id,
        timeout_s=new.timeout_s,
        attempts=0,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id)


def list_jobs(
    session: Session,
    *,
    status: str | None,
    model: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Job], int]:
    stmt = select(Job)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if model is not None:
        stmt = stmt.where(Job.model == model)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(
        stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def cancel_job(session: Session, job_id: uuid.UUID) -> bool:
    """Mark a queued or running job cancelled; False if it had already finished."""
    updated = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RUNNABLE))
        .values(status=JobStatus.CANCELLED.value, finished_at=func.now())
        .returning(Job.id)
    ).first()
    return updated is not None


def claim_job(session: Session, job_id: uuid.UUID, worker: str) -> Job | None:
    """Move a queued job to running for this worker; None if another worker holds it, or it was
    cancelled or has finished. A duplicate delivery therefore never runs a job twice at once;
    a job whose worker was lost is put back to queued by the reconciler, then claimed anew."""
    return session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            started_at=func.coalesce(Job.started_at, func.now()),
            attempts=Job.attempts + 1,
            worker=worker,
        )
        .returning(Job)
    ).first()


@dataclass(frozen=True)
class Delivery:
    """What it takes to send a job to the broker."""

    id: uuid.UUID
    kind: str
    queue: str


def stale_queued(session: Session, older_than_s: float, limit: int) -> list[Delivery]:
    """Queued jobs last sent to the broker more than `older_than_s` ago, oldest first."""
    cutoff = func.now() - timedelta(seconds=older_than_s)
    rows = session.execute(
        select(Job.id, Job.kind, Job.queue)
        .where(
            Job.status == JobStatus.QUEUED.value,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return [Delivery(row.id, row.kind, row.queue) for row in rows]


def running_workers(session: Session) -> set[str]:
    """The workers that hold running jobs."""
    rows = session.scalars(
        select(Job.worker).where(Job.status == JobStatus.RUNNING.value).distinct()
    )
    return {worker for worker in rows if worker is not None}


def release_jobs_of(
    session: Session, workers: set[str], max_attempts: int
) -> tuple[int, list[str]]:
    """Put the running jobs of lost workers back to queued, to be sent again; a job that has
    already lost `max_attempts` workers fails instead, as it may be what kills them.
    Returns how many were requeued, and the model of each job that failed."""
    if not workers:
        return 0, []
    of_lost = (Job.status == JobStatus.RUNNING.value, Job.worker.in_(workers))
    failed = session.scalars(
        update(Job)
        .where(*of_lost, Job.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED.value,
            finished_at=func.now(),
            error_category=ErrorCategory.WORKER_LOST.value,
            error_message=f"its worker was lost {max_attempts} times while running it",
        )
        .returning(Job.model)
    ).all()
    requeued = session.execute(
        update(Job)
        .where(*of_lost)
        .values(status=JobStatus.QUEUED.value, worker=None, enqueued_at=None)
        .returning(Job.id)
    ).all()
    return len(requeued), list(failed)


def mark_enqueued(session: Session, job_ids: list[uuid.UUID]) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=func.now()))


def cancelled_among(session: Session, job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    rows = session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.CANCELLED.value)
    )
    return set(rows)


def complete_job(session: Session, job_id: uuid.UUID, worker: str, outcome: Outcome) -> bool:
    """Store the result and usage and mark the job succeeded, exactly once: only the worker that
    holds the job may, so a worker that was presumed lost and comes back writes nothing."""
    job = session.scalars(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(status=JobStatus.SUCCEEDED.value, finished_at=func.now())
        .returning(Job)
    ).first()
    if job is None:
        return False
    session.execute(
        pg_insert(JobResult)
        .values(
            job_id=job_id,
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            time_to_first_token_ms=outcome.time_to_first_token_ms,
            duration_ms=outcome.duration_ms,
        )
        .on_conflict_do_nothing()
    )
    session.execute(
        pg_insert(Usage)
        .values(
            job_id=job_id,
            owner=job.owner,
            model=job.model,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            cached=False,
        )
        .on_conflict_do_nothing()
    )
    return True


def fail_job(session: Session, job_id: uuid.UUID, worker: str, category: str, message: str) -> bool:
    """Mark a job failed; like a result, only by the worker that holds it."""
    failed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(
            status=JobStatus.FAILED.value,
            finished_at=func.now(),
            error_category=category,
            error_message=message[:4000],
        )
        .returning(Job.id)
    ).first()
    return failed is not None
