"""Job queries. Every status change is a compare-and-set, so duplicate deliveries write once."""

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Boolean, Interval, Row, bindparam, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, aliased, selectinload

from db.queries.usage import Charge, insert_usage
from db.tables import Job, JobResult, ScoreResult, Usage
from llmq.pricing import Price
from llmq.protocol import BATCH_PRIORITY, ErrorCategory, JobStatus

job_table = Job.__table__
RUNNABLE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
# A model's price in force now (llmq.price_book.PriceBook.price); None: it has none.
PriceOf = Callable[[str], Price | None]


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
    priority: int = 0
    batch_id: str | None = None
    cache_key: str | None = None  # deterministic jobs only (llmq/fingerprint.py)
    follows_job_id: uuid.UUID | None = None  # an identical job in flight, whose result it gets
    trace_context: str | None = None  # a W3C traceparent, when the request is traced
    stream_tokens: bool = True  # its text published token by token, not only whole at its end


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    duration_ms: float
    logprobs: dict | None = None  # {"prompt": ..., "completion": ...} when the job asked


def find_by_idempotency_key(session: Session, owner: str | None, key: str) -> Job | None:
    stmt = select(Job).where(Job.idempotency_key == key)
    stmt = stmt.where(Job.owner.is_(None) if owner is None else Job.owner == owner)
    return session.scalars(stmt).first()


def job_parameters(new: NewJob) -> dict[str, Any]:
    """The columns of a new queued job's row that come from the job: all but its times."""
    return {
        "id": uuid.uuid4(),
        "kind": new.kind,
        "model": new.model,
        "queue": new.queue,
        "status": JobStatus.QUEUED.value,
        "input": new.input,
        "params": new.params,
        "owner": new.owner,
        "idempotency_key": new.idempotency_key,
        "request_id": new.request_id,
        "timeout_s": new.timeout_s,
        "priority": new.priority,
        "batch_id": new.batch_id,
        "cache_key": new.cache_key,
        "follows_job_id": new.follows_job_id,
        "trace_context": new.trace_context,
        "stream_tokens": new.stream_tokens,
        "attempts": 0,
    }


def job_values(new: NewJob) -> dict[str, Any]:
    """The columns of a new queued job's row."""
    return job_parameters(new) | {
        # The send follows the commit; the reconciler covers a failure. A follower is not sent.
        "enqueued_at": None if new.follows_job_id else func.now(),
        # The row's own time, not its transaction's: the jobs of one request (an OpenAI
        # request's choices) are stored in one transaction and keep their order.
        "created_at": func.clock_timestamp(),
    }


# The statement that stores new jobs, built once and given each job's columns as parameters.
# Given a list of them, SQLAlchemy renders one multi-row INSERT from the statement it compiled
# once ("insertmanyvalues"), where a statement built with a group's rows inline is compiled
# again for every group: 2.7 against 10.3 ms of CPU for 30 jobs, measured by hand. Its rows
# may read the same microsecond from the clock: each is set its place later, so they keep their
# order as separate inserts would. A follower is not sent, so it has no enqueued_at.
_INSERT = insert(job_table).values(
    enqueued_at=case((bindparam("sent", type_=Boolean), func.now())),
    created_at=func.clock_timestamp() + bindparam("place", type_=Interval),
)
_INSERT_RETURNING = _INSERT.returning(*job_table.c, sort_by_parameter_order=True)


def job_row(new: NewJob) -> Job:
    """The row of a new queued job, not yet in a session."""
    return Job(**job_values(new))


def create_job(session: Session, new: NewJob) -> Job:
    job = job_row(new)
    session.add(job)
    session.flush()
    return job


def insert_job(session: Session, new: NewJob) -> Job:
    """create_job in one round trip, for the submit path: the columns Postgres fills in come
    back with the INSERT, and the job is built in memory, outside the session, with no result
    yet, so that answering the request after the commit needs no Postgres."""
    return insert_jobs(session, [new])[0]


def insert_jobs(session: Session, new_jobs: list[NewJob]) -> list[Job]:
    """insert_job for many jobs in one statement, in order."""
    if not new_jobs:
        return []
    jobs = []
    for row in session.execute(_INSERT_RETURNING, _insert_parameters(new_jobs)):
        job = Job(**row._mapping)
        job.result = None
        jobs.append(job)
    return jobs


def insert_job_ids(session: Session, new_jobs: list[NewJob]) -> list[uuid.UUID]:
    """Many jobs in one statement; their ids, in order."""
    if not new_jobs:
        return []
    parameters = _insert_parameters(new_jobs)
    session.execute(_INSERT, parameters)
    return [row["id"] for row in parameters]


def _insert_parameters(new_jobs: list[NewJob]) -> list[dict[str, Any]]:
    return [
        job_parameters(new)
        | {"sent": new.follows_job_id is None, "place": timedelta(microseconds=place)}
        for place, new in enumerate(new_jobs)
    ]


def get_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id)


_result_table = JobResult.__table__
_result_columns = [column.label(f"result_{column.name}") for column in _result_table.c]
_usage_table = Usage.__table__


def read_job(session: Session, job_id: uuid.UUID) -> Job | None:
    """get_job in one round trip, for answering reads: the job joined with its result, built in
    memory outside the session (the ORM's load asks for the result in a second query)."""
    stmt = (
        select(
            job_table,
            *_result_columns,
            _usage_table.c.cost.label("usage_cost"),
            _usage_table.c.currency.label("usage_currency"),
        )
        .outerjoin(_result_table, _result_table.c.job_id == job_table.c.id)
        .outerjoin(_usage_table, _usage_table.c.job_id == job_table.c.id)
        .where(job_table.c.id == job_id)
    )
    row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    values = row._mapping
    job = Job(**{column.name: values[column.name] for column in job_table.c})
    job.result = None
    if values["result_job_id"] is not None:
        job.result = JobResult(**{c.name: values[f"result_{c.name}"] for c in _result_table.c})
    if values["usage_cost"] is not None:
        job.usage = Usage(cost=values["usage_cost"], currency=values["usage_currency"])
    return job


def list_jobs(
    session: Session,
    *,
    status: str | None,
    model: str | None,
    limit: int,
    offset: int,
    owner: str | None = None,
) -> tuple[list[Job], int]:
    """A page of jobs, newest first, with the count of all that match; only `owner`'s when
    given."""
    stmt = select(Job)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if model is not None:
        stmt = stmt.where(Job.model == model)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(
        stmt.order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
        .options(selectinload(Job.usage))
    ).all()
    return list(rows), total


def cancel_job(session: Session, job_id: uuid.UUID) -> bool:
    """Mark a queued or running job cancelled; False if it had already finished. Jobs that
    followed it still want their result: they go back to the queue (`release_followers`)."""
    updated = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RUNNABLE))
        .values(status=JobStatus.CANCELLED.value, finished_at=func.now())
        .returning(Job.id)
    ).first()
    if updated is None:
        return False
    release_followers(session, job_id)
    return True


def release_followers(session: Session, leader_id: uuid.UUID) -> uuid.UUID | None:
    """The queued followers of a job that will not give them a result (cancelled, or failed for
    a reason other than their common input) get one of their own: the oldest becomes a job like
    any other, left for the reconciler to send, and the others follow it. Returns its id."""
    heir = session.scalar(
        select(Job.id)
        .where(Job.follows_job_id == leader_id, Job.status == JobStatus.QUEUED.value)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    )
    if heir is None:
        return None
    session.execute(
        update(Job)
        .where(
            Job.follows_job_id == leader_id,
            Job.status == JobStatus.QUEUED.value,
            Job.id != heir,
        )
        .values(follows_job_id=heir)
    )
    session.execute(update(Job).where(Job.id == heir).values(follows_job_id=None, enqueued_at=None))
    return heir


def claim_job(session: Session, job_id: uuid.UUID, worker: str) -> Row | None:
    """Move a queued job to running for this worker; None if another worker holds it, or it was
    cancelled or has finished. A duplicate delivery therefore never runs a job twice at once;
    a job whose worker was lost is put back to queued by the reconciler, then claimed anew."""
    claimed = claim_jobs(session, [job_id], worker)
    return claimed[0] if claimed else None


# What a worker reads of a job it claims. Core rows, not ORM objects: a claim is on every job's
# path, and an ORM row would also load its result relationship.
CLAIMED_COLUMNS = (
    job_table.c.id,
    job_table.c.kind,
    job_table.c.model,
    job_table.c.queue,
    job_table.c.input,
    job_table.c.params,
    job_table.c.owner,
    job_table.c.request_id,
    job_table.c.timeout_s,
    job_table.c.priority,
    job_table.c.attempts,
    job_table.c.created_at,
    job_table.c.started_at,
    job_table.c.trace_context,
    job_table.c.stream_tokens,
)


# Built once, like the other statements on every job's path, with the jobs and the worker as
# parameters: SQLAlchemy finds its compiled form by a key computed once, where a statement
# built per call costs its construction and a key over it each time (about 430 against 180 µs
# of the worker's CPU a claim of four jobs, measured by hand).
_CLAIM = (
    update(job_table)
    .where(
        job_table.c.id.in_(bindparam("job_ids", expanding=True)),
        job_table.c.status == JobStatus.QUEUED.value,
    )
    .values(
        status=JobStatus.RUNNING.value,
        started_at=func.coalesce(job_table.c.started_at, func.now()),
        attempts=job_table.c.attempts + 1,
        worker=bindparam("claimer"),
    )
    .returning(*CLAIMED_COLUMNS)
)


def claim_jobs(session: Session, job_ids: list[uuid.UUID], worker: str) -> list[Row]:
    """claim_job for several jobs in one statement: those of them that are queued."""
    return list(session.execute(_CLAIM, {"job_ids": job_ids, "claimer": worker}))


@dataclass(frozen=True)
class Delivery:
    """What it takes to send a job to the broker."""

    id: uuid.UUID
    kind: str
    queue: str
    priority: int
    trace_context: str | None = None  # made current while its message is sent


def stale_queued(session: Session, older_than_s: float, limit: int) -> list[Delivery]:
    """Queued jobs last sent to the broker more than `older_than_s` ago, oldest first.

    Followers are never sent: their leader's outcome settles them in its own transaction. Only
    a follower left behind by a leader that finished without settling it is sent, so that no
    job can wait forever."""
    cutoff = func.now() - timedelta(seconds=older_than_s)
    leader = aliased(Job)
    leader_in_flight = (
        select(leader.id)
        .where(leader.id == Job.follows_job_id, leader.status.in_(RUNNABLE))
        .exists()
    )
    rows = session.execute(
        select(Job.id, Job.kind, Job.queue, Job.priority, Job.trace_context)
        .where(
            Job.status == JobStatus.QUEUED.value,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff),
            or_(Job.follows_job_id.is_(None), ~leader_in_flight),
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return [Delivery(row.id, row.kind, row.queue, row.priority, row.trace_context) for row in rows]


def running_jobs_by_worker(session: Session) -> dict[str, set[str]]:
    """The ids of the running jobs of each worker."""
    held: dict[str, set[str]] = {}
    for job_id, worker in session.execute(
        select(Job.id, Job.worker).where(
            Job.status == JobStatus.RUNNING.value, Job.worker.is_not(None)
        )
    ):
        held.setdefault(worker, set()).add(str(job_id))
    return held


def release_jobs(session: Session, job_ids: set[str]) -> int:
    """Put running jobs back to queued, to be sent again."""
    if not job_ids:
        return 0
    released = session.execute(
        update(Job)
        .where(Job.id.in_([uuid.UUID(j) for j in job_ids]), Job.status == JobStatus.RUNNING.value)
        .values(status=JobStatus.QUEUED.value, worker=None, enqueued_at=None)
        .returning(Job.id)
    ).all()
    return len(released)


def hand_back(session: Session, job_ids: list[uuid.UUID], worker: str) -> list[uuid.UUID]:
    """Put this worker's running jobs back to queued: its model was unloaded under them (a
    forced unload), and their message goes back to the queue at once, so they count as sent
    now (the reconciler re-sends them only if that message is lost)."""
    if not job_ids:
        return []
    return list(
        session.scalars(
            update(Job)
            .where(
                Job.id.in_(job_ids),
                Job.status == JobStatus.RUNNING.value,
                Job.worker == worker,
            )
            .values(status=JobStatus.QUEUED.value, worker=None, enqueued_at=func.now())
            .returning(Job.id)
        )
    )


def release_jobs_of(
    session: Session, workers: set[str], max_attempts: int
) -> tuple[int, list[str]]:
    """Put the running jobs of lost workers back to queued, to be sent again; a job that has
    already lost `max_attempts` workers fails instead, as it may be what kills them.
    Returns how many were requeued, and the model of each job that failed. The followers of a
    failed job are released: losing workers says nothing about their input."""
    if not workers:
        return 0, []
    of_lost = (Job.status == JobStatus.RUNNING.value, Job.worker.in_(workers))
    failed = session.scalars(
        update(Job)
        .where(*of_lost, Job.attempts >= max_attempts)
        .values(
            failed_values(
                ErrorCategory.WORKER_LOST.value,
                f"its worker was lost {max_attempts} times while running it",
            )
        )
        .returning(Job.id, Job.model)
    ).all()
    for job in failed:
        release_followers(session, job.id)
    requeued = session.execute(
        update(Job)
        .where(*of_lost)
        .values(status=JobStatus.QUEUED.value, worker=None, enqueued_at=None)
        .returning(Job.id)
    ).all()
    return len(requeued), [job.model for job in failed]


def mark_enqueued(session: Session, job_ids: list[uuid.UUID]) -> None:
    """Restart the resend clock of jobs still queued. Rows another transaction holds (a worker
    claiming or finishing them) are skipped, so this never waits on or deadlocks with it."""
    if not job_ids:
        return
    free = (
        select(Job.id)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value)
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    session.execute(update(Job).where(Job.id.in_(free)).values(enqueued_at=func.now()))


def cancelled_among(session: Session, job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    rows = session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.CANCELLED.value)
    )
    return set(rows)


class Completed(NamedTuple):
    """A job complete_jobs stored: its row as the update left it, and its usage's cost."""

    id: uuid.UUID
    owner: str | None
    model: str
    cache_key: str | None
    input: dict[str, Any] | None  # only a job with a cache key's (its cache entry's key)
    attempts: int
    started_at: datetime | None
    finished_at: datetime
    charge: Charge | None  # None: a usage row of the job was there already, and stays


def complete_job(
    session: Session, job_id: uuid.UUID, worker: str, outcome: Outcome, *, price_of: PriceOf
) -> Completed | None:
    """Store the result and usage (priced by `price_of` now) and mark the job succeeded,
    exactly once: only the worker that holds the job may, so a worker that was presumed lost
    and comes back writes nothing. Returns the job, or None when it was not this worker's to
    complete."""
    return complete_jobs(session, worker, {job_id: outcome}, price_of=price_of).get(job_id)


# complete_jobs' first statement, built once (see _CLAIM).
_COMPLETE = (
    update(job_table)
    .where(
        job_table.c.id.in_(bindparam("job_ids", expanding=True)),
        job_table.c.status == JobStatus.RUNNING.value,
        job_table.c.worker == bindparam("holder"),
    )
    .values(status=JobStatus.SUCCEEDED.value, finished_at=func.now())
    .returning(
        job_table.c.id,
        job_table.c.owner,
        job_table.c.model,
        job_table.c.cache_key,
        # Only a cached job's input is needed (the cache entry's key): a prompt can be long.
        case((job_table.c.cache_key.is_not(None), job_table.c.input)).label("input"),
        # What a read of the job would show of its end, for its final event.
        job_table.c.attempts,
        job_table.c.started_at,
        job_table.c.finished_at,
    )
)


def complete_jobs(
    session: Session, worker: str, outcomes: dict[uuid.UUID, Outcome], *, price_of: PriceOf
) -> dict[uuid.UUID, Completed]:
    """complete_job for many jobs in three statements, whatever their number. Returns the jobs
    that were this worker's to complete."""
    done = session.execute(_COMPLETE, {"job_ids": list(outcomes), "holder": worker}).all()
    if not done:
        return {}
    # One statement compiled once, whatever the number of rows (SQLAlchemy's insertmanyvalues
    # sends them together); a multi-row VALUES built per call was compiled anew each time.
    session.execute(_INSERT_RESULTS, [_result_values(row.id, outcomes[row.id]) for row in done])
    charges = insert_usage(
        session,
        [usage_values(row, outcomes[row.id], price_of(row.model), cached=False) for row in done],
    )
    return {row.id: Completed(**row._mapping, charge=charges.get(row.id)) for row in done}


_INSERT_RESULTS = pg_insert(_result_table).on_conflict_do_nothing()
_INSERT_SCORES = pg_insert(ScoreResult.__table__).on_conflict_do_nothing()


def store_score_results(session: Session, rows: list[dict[str, Any]]) -> None:
    """Scoring jobs' outputs ({"job_id", "loglikelihoods", "greedy"} each) in one statement."""
    if rows:
        session.execute(_INSERT_SCORES, rows)


def _result_values(job_id: uuid.UUID, outcome: Outcome) -> dict:
    return {
        "job_id": job_id,
        "text": outcome.text,
        "finish_reason": outcome.finish_reason,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "time_to_first_token_ms": outcome.time_to_first_token_ms,
        "duration_ms": outcome.duration_ms,
        "logprobs": outcome.logprobs,
    }


def usage_values(job, outcome: Outcome, price: Price | None, *, cached: bool) -> dict:
    """A usage row of a finished job (any object with id, owner and model), with its cost at
    `price`, the model's price now."""
    cost = None
    if price is not None:
        cost = price.cost(outcome.prompt_tokens, outcome.completion_tokens, cached=cached)
    return {
        "job_id": job.id,
        "owner": job.owner,
        "model": job.model,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "cached": cached,
        "cost": cost,
        "currency": price.currency if price is not None else None,
    }


def failed_values(category: str, message: str) -> dict:
    """The columns of a job that ends failed."""
    return {
        "status": JobStatus.FAILED.value,
        "finished_at": func.now(),
        "error_category": category,
        "error_message": message[:4000],
    }


def fail_job(session: Session, job_id: uuid.UUID, worker: str, category: str, message: str) -> bool:
    """Mark a job failed; like a result, only by the worker that holds it."""
    failed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(failed_values(category, message))
        .returning(Job.id)
    ).first()
    return failed is not None


def open_background_jobs(session: Session) -> dict[str, int]:
    """Background jobs (Batch API lines and evaluation items) queued or running, per model."""
    rows = session.execute(
        select(Job.model, func.count())
        .where(
            Job.priority >= BATCH_PRIORITY,
            Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)),
        )
        .group_by(Job.model)
    ).all()
    return {model: count for model, count in rows}
