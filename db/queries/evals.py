"""Evaluation run queries. A run's progress is read from its items and their jobs, never kept
in memory: whatever process reads it, after whatever restart, sees the same run.

An item is pending (no job yet), then waiting on its job, then graded (`graded_at` set: its
metrics, or the error its job failed with). Items with equal request keys share one job.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from db.tables import EvalItem, EvalRun, Job, JobResult, ScoreResult
from llmq.protocol import FINAL_STATUSES, JobStatus

IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
FINAL = tuple(s.value for s in FINAL_STATUSES)


class RunStatus:
    QUEUED = "queued"  # accepted; its items are not planned yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    # It could not start (unreadable data, an unknown model), or some items failed for good:
    # then its scores cover only the others, and its error says how many.
    FAILED = "failed"
    CANCELLED = "cancelled"
    ACTIVE = (QUEUED, RUNNING)


@dataclass(frozen=True)
class NewRun:
    benchmark: str
    model: str
    num_fewshot: int
    limit: int | None
    subjects: list[str] | None
    dataset: str
    owner: str | None = None  # the API key that started it


@dataclass(frozen=True)
class NewItem:
    position: int
    task: str
    doc_index: int
    kind: str
    input: dict[str, Any]
    params: dict[str, Any]
    request_key: str
    gold: str


@dataclass(frozen=True)
class Progress:
    total: int
    graded: int  # succeeded + failed
    failed: int
    reused: int  # answered by earlier runs' jobs
    in_flight: int  # items whose job is queued or running
    graded_here: int  # graded items this run computed itself (not reused)


@dataclass(frozen=True)
class Finished:
    """An item whose job has ended, with what the job produced."""

    item_id: int
    kind: str
    gold: str
    job_status: str
    error: str | None
    text: str | None
    loglikelihoods: list[float] | None


def create_run(session: Session, new: NewRun) -> EvalRun:
    run = EvalRun(
        id=uuid.uuid4(),
        benchmark=new.benchmark,
        model=new.model,
        status=RunStatus.QUEUED,
        num_fewshot=new.num_fewshot,
        limit=new.limit,
        subjects=new.subjects,
        dataset=new.dataset,
        owner=new.owner,
        total=0,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: uuid.UUID) -> EvalRun | None:
    return session.get(EvalRun, run_id)


def list_runs(
    session: Session, limit: int, offset: int, owner: str | None = None
) -> tuple[list[EvalRun], int]:
    """A page of runs, newest first, and how many there are; only `owner`'s when given."""
    stmt = select(EvalRun)
    if owner is not None:
        stmt = stmt.where(EvalRun.owner == owner)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(
        stmt.order_by(EvalRun.created_at.desc(), EvalRun.id).limit(limit).offset(offset)
    )
    return list(rows), total


def runs_with_status(session: Session, status: str) -> list[uuid.UUID]:
    return list(session.scalars(select(EvalRun.id).where(EvalRun.status == status)))


def lock_run(session: Session, run_id: uuid.UUID, status: str) -> EvalRun | None:
    """The run, locked for this transaction, if it has `status` and no one else holds it."""
    return session.scalars(
        select(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status == status)
        .with_for_update(skip_locked=True)
    ).first()


def store_plan(session: Session, run: EvalRun, items: list[NewItem]) -> int:
    """Insert the run's items, point those answered before at the earlier jobs, and start the
    run. Returns how many items were reused."""
    session.execute(
        EvalItem.__table__.insert(),
        [{"run_id": run.id, "reused": False, **vars(item)} for item in items],
    )
    # A succeeded job with the same request key answers an item: the same model, kind, input
    # and parameters give the same result.
    earlier = (
        select(EvalItem.request_key, EvalItem.job_id)
        .ext(distinct_on(EvalItem.request_key))
        .join(Job, Job.id == EvalItem.job_id)
        .where(
            Job.status == JobStatus.SUCCEEDED.value,
            EvalItem.run_id != run.id,
            EvalItem.request_key.in_(select(EvalItem.request_key).where(EvalItem.run_id == run.id)),
        )
        .order_by(EvalItem.request_key, Job.finished_at)
        .subquery()
    )
    reused = session.execute(
        update(EvalItem)
        .where(EvalItem.run_id == run.id, EvalItem.request_key == earlier.c.request_key)
        .values(job_id=earlier.c.job_id, reused=True)
        .returning(EvalItem.id)
    ).all()
    run.status = RunStatus.RUNNING
    run.total = len(items)
    run.started_at = func.now()
    return len(reused)


def fail_run(session: Session, run_id: uuid.UUID, error: str) -> None:
    session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status.in_(RunStatus.ACTIVE))
        .values(status=RunStatus.FAILED, error=error[:4000], finished_at=func.now())
    )


def in_flight_jobs(session: Session, run_id: uuid.UUID) -> int:
    return (
        session.scalar(
            select(func.count(func.distinct(EvalItem.job_id)))
            .join(Job, Job.id == EvalItem.job_id)
            .where(EvalItem.run_id == run_id, Job.status.in_(IN_FLIGHT))
        )
        or 0
    )


def next_requests(session: Session, run_id: uuid.UUID, count: int) -> list[Row]:
    """The first `count` distinct requests of the run that have no job yet, in item order:
    rows of position, request_key, kind, input and params."""
    items = EvalItem.__table__.c
    rows = session.execute(
        select(items.position, items.request_key, items.kind, items.input, items.params)
        .where(items.run_id == run_id, items.job_id.is_(None), items.graded_at.is_(None))
        .order_by(items.position)
        .limit(count * 4)  # duplicates of a request are rare; a short page is taken next sweep
    )
    first: dict[str, Row] = {}
    for item in rows:
        if len(first) == count:
            break
        first.setdefault(item.request_key, item)
    return list(first.values())


_items = EvalItem.__table__.c
_ASSIGN_JOB = (
    update(EvalItem.__table__)
    .where(
        _items.run_id == bindparam("run"),
        _items.request_key == bindparam("key"),
        _items.job_id.is_(None),
    )
    .values(job_id=bindparam("job"))
)


def assign_jobs(session: Session, run_id: uuid.UUID, assigned: list[tuple[str, uuid.UUID]]) -> None:
    """Give each request (request_key, job id) its job: every item of the run with that key."""
    if assigned:
        session.execute(
            _ASSIGN_JOB, [{"run": run_id, "key": key, "job": job_id} for key, job_id in assigned]
        )


def finished_items(session: Session, run_id: uuid.UUID, limit: int) -> list[Finished]:
    """Ungraded items whose job has ended, with the job's text or log-likelihoods."""
    rows = session.execute(
        select(
            EvalItem.id,
            EvalItem.kind,
            EvalItem.gold,
            Job.status,
            Job.error_category,
            Job.error_message,
            JobResult.text,
            ScoreResult.loglikelihoods,
        )
        .join(Job, Job.id == EvalItem.job_id)
        .outerjoin(JobResult, JobResult.job_id == Job.id)
        .outerjoin(ScoreResult, ScoreResult.job_id == Job.id)
        .where(
            EvalItem.run_id == run_id,
            # Spelled out (the join implies it) so that the partial index ix_eval_items_ungraded
            # serves the scan: it holds only the items with a job and no grade.
            EvalItem.job_id.is_not(None),
            EvalItem.graded_at.is_(None),
            Job.status.in_(FINAL),
        )
        .order_by(EvalItem.position)
        .limit(limit)
    )
    finished = []
    for row in rows:
        error = None
        if row.status != JobStatus.SUCCEEDED.value:
            error = f"job {row.status}: {row.error_category or ''} {row.error_message or ''}"
        finished.append(
            Finished(
                row.id,
                row.kind,
                row.gold,
                row.status,
                error.strip() if error else None,
                row.text,
                row.loglikelihoods,
            )
        )
    return finished


def store_grades(session: Session, grades: list[dict[str, Any]]) -> None:
    """`grades`: {"id", "output", "details", "metrics", "error"} per item. Grading is a pure
    function of the job's result, so a grade written twice is written the same."""
    if grades:
        now = datetime.now(UTC)
        session.execute(update(EvalItem), [g | {"graded_at": now} for g in grades])


def has_ungraded(session: Session, run_id: uuid.UUID) -> bool:
    """Whether any item of the run still waits for a job or a grade; reads the partial indexes
    only, so the driver can ask at every sweep whatever the run's size."""
    waiting = EvalItem.run_id == run_id, EvalItem.graded_at.is_(None)
    unassigned = select(EvalItem.id).where(*waiting, EvalItem.job_id.is_(None)).limit(1)
    assigned = select(EvalItem.id).where(*waiting, EvalItem.job_id.is_not(None)).limit(1)
    return bool(session.scalar(select(unassigned.exists() | assigned.exists())))


def progress(session: Session, run_id: uuid.UUID, total: int) -> Progress:
    graded = EvalItem.graded_at.is_not(None)
    row = session.execute(
        select(
            func.count().filter(graded),
            func.count().filter(graded, EvalItem.error.is_not(None)),
            func.count().filter(EvalItem.reused),
            func.count().filter(Job.status.in_(IN_FLIGHT), EvalItem.graded_at.is_(None)),
            func.count().filter(graded, ~EvalItem.reused),
        )
        .select_from(EvalItem)
        .outerjoin(Job, Job.id == EvalItem.job_id)
        .where(EvalItem.run_id == run_id)
    ).one()
    return Progress(total, *row)


def graded_metrics(session: Session, run_id: uuid.UUID) -> list[tuple[str, dict[str, float]]]:
    """(task, metrics) of every item graded with metrics, in item order."""
    rows = session.execute(
        select(EvalItem.task, EvalItem.metrics)
        .where(EvalItem.run_id == run_id, EvalItem.metrics.is_not(None))
        .order_by(EvalItem.position)
    )
    # A failed item's metrics are a JSON null, which `IS NOT NULL` lets through.
    return [(row.task, row.metrics) for row in rows if row.metrics is not None]


def finish_run(
    session: Session, run_id: uuid.UUID, scores: dict[str, Any], error: str | None = None
) -> bool:
    """End a running run with its final scores once every item is graded: succeeded, or
    failed with `error` when some items failed."""
    status = RunStatus.SUCCEEDED if error is None else RunStatus.FAILED
    done = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status == RunStatus.RUNNING)
        .values(status=status, scores=scores, error=error, finished_at=func.now())
        .returning(EvalRun.id)
    ).first()
    return done is not None


def cancel_run(session: Session, run_id: uuid.UUID) -> bool:
    """Cancel an active run and the jobs it still waits on; False if it had already ended.
    Only this run's own jobs can be in flight: earlier runs lend only finished ones."""
    cancelled = session.execute(
        update(EvalRun)
        .where(EvalRun.id == run_id, EvalRun.status.in_(RunStatus.ACTIVE))
        .values(status=RunStatus.CANCELLED, finished_at=func.now())
        .returning(EvalRun.id)
    ).first()
    if cancelled is None:
        return False
    session.execute(
        update(Job)
        .where(
            Job.id.in_(select(EvalItem.job_id).where(EvalItem.run_id == run_id)),
            Job.status.in_(IN_FLIGHT),
        )
        .values(status=JobStatus.CANCELLED.value, finished_at=func.now())
    )
    return True


def list_items(
    session: Session, run_id: uuid.UUID, *, task: str | None, limit: int, offset: int
) -> tuple[list[tuple[EvalItem, str | None]], int]:
    """A page of the run's items in order, each with its job's status, and how many items the
    run has. The page and its total come from one statement, so that they agree while the
    run's driver adds items."""
    total = func.count().over().label("total")
    stmt = select(EvalItem, Job.status, total).outerjoin(Job, Job.id == EvalItem.job_id)
    stmt = stmt.where(EvalItem.run_id == run_id)
    count = select(func.count()).select_from(EvalItem).where(EvalItem.run_id == run_id)
    if task is not None:
        stmt = stmt.where(EvalItem.task == task)
        count = count.where(EvalItem.task == task)
    rows = session.execute(stmt.order_by(EvalItem.position).limit(limit).offset(offset)).all()
    if rows:
        return [(row[0], row[1]) for row in rows], rows[0][2]
    # An empty first page means no items; past the end, only a count says how many there are.
    return [], (session.scalar(count) or 0) if offset else 0


def item_state(job_status: str | None, item: EvalItem) -> str:
    """pending (no job yet), queued, running, succeeded or failed."""
    if item.graded_at is not None:
        return "failed" if item.error is not None else "succeeded"
    return job_status if job_status in IN_FLIGHT else "pending"
