"""Usage queries: tokens by key, model and day from the `usage` table (one row per finished job),
and the figures a key's limits are checked against.

Times are UTC: days and calendar months start at midnight UTC.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import ColumnElement, Date, bindparam, func, literal, select
from sqlalchemy.orm import Session

from db.tables import Job, Usage
from llmq.protocol import JobStatus

IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class Load:
    """What a key has in flight and has spent, for its limits."""

    jobs_in_flight: int  # queued or running
    tokens_this_month: int  # prompt + completion tokens computed for it (cache hits are free)


@dataclass
class Totals:
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt + completion, those answered from the completion cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Totals") -> None:
        self.jobs += other.jobs
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens


def month_start(now: datetime) -> datetime:
    return datetime.combine(now.astimezone(UTC).date().replace(day=1), time(), UTC)


def next_month_start(now: datetime) -> datetime:
    return month_start(month_start(now) + timedelta(days=32))


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def _owned_by(column, owner: str | None) -> ColumnElement[bool]:
    return column.is_(None) if owner is None else column == owner


# Built once: this runs on every submission of a key with limits, and building and compiling
# the statement each time would cost more than running it.
_JOBS_IN_FLIGHT = (
    select(func.count())
    .select_from(Job)
    .where(Job.owner == bindparam("owner"), Job.status.in_(IN_FLIGHT))
    .scalar_subquery()
)
_TOKENS_SINCE = (
    select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0))
    .where(Usage.owner == bindparam("owner"), Usage.created_at >= bindparam("since"), ~Usage.cached)
    .scalar_subquery()
)
_LOAD = {
    (True, True): select(_JOBS_IN_FLIGHT, _TOKENS_SINCE),
    (True, False): select(_JOBS_IN_FLIGHT, literal(0)),
    (False, True): select(literal(0), _TOKENS_SINCE),
}


def load(session: Session, owner: str, *, count_jobs: bool, since: datetime | None) -> Load:
    """One round trip: the owner's jobs queued or running (when `count_jobs`), and the tokens
    computed for it since `since` (when given)."""
    if not count_jobs and since is None:
        return Load(0, 0)
    statement = _LOAD[(count_jobs, since is not None)]
    row = session.execute(statement, {"owner": owner, "since": since}).one()
    return Load(int(row[0]), int(row[1]))


def tokens_since(session: Session, owner: str | None, since: datetime) -> int:
    """Prompt + completion tokens computed for the owner (not cache hits) since `since`."""
    used = session.scalar(
        select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0)).where(
            _owned_by(Usage.owner, owner), Usage.created_at >= since, ~Usage.cached
        )
    )
    return int(used or 0)


def _totals_columns():
    cached_tokens = func.sum(Usage.prompt_tokens + Usage.completion_tokens).filter(Usage.cached)
    return (
        func.count(),
        func.sum(Usage.prompt_tokens),
        func.sum(Usage.completion_tokens),
        func.coalesce(cached_tokens, 0),
    )


def _totals(row) -> Totals:
    return Totals(*(int(value or 0) for value in row))


def by_model_and_day(
    session: Session, owner: str | None, start: datetime, end: datetime
) -> list[tuple[str, date, Totals]]:
    """The owner's usage in [start, end), per model and UTC day."""
    day = func.date(func.timezone("UTC", Usage.created_at), type_=Date)
    rows = session.execute(
        select(Usage.model, day.label("day"), *_totals_columns())
        .where(_owned_by(Usage.owner, owner), Usage.created_at >= start, Usage.created_at < end)
        .group_by(Usage.model, day)
        .order_by(day, Usage.model)
    )
    return [(row[0], row[1], _totals(row[2:])) for row in rows]


def by_owner(session: Session, start: datetime, end: datetime) -> list[tuple[str | None, Totals]]:
    """Everyone's usage in [start, end), per owner (an API key's id), most tokens first."""
    tokens = func.sum(Usage.prompt_tokens + Usage.completion_tokens)
    rows = session.execute(
        select(Usage.owner, *_totals_columns())
        .where(Usage.created_at >= start, Usage.created_at < end)
        .group_by(Usage.owner)
        .order_by(tokens.desc(), Usage.owner)
    )
    return [(row[0], _totals(row[1:])) for row in rows]
