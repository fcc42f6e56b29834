"""Usage queries: tokens and cost by key, model and day from the `usage` table (one row per
finished job), and the figures a key's limits are checked against.

Times are UTC: days and calendar months start at midnight UTC. Costs are summed per currency
(a deployment charges in one, but rows keep the one they were charged in).

Usage rows are written here (`insert_usage`), and the cost of those a transaction wrote is
counted in the `llmq_cost_total` metric once it commits: a group of results that fails and is
written again row by row is counted once, a rolled-back one never.
"""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Date, Numeric, bindparam, event, func, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.tables import Job, Usage
from llmq.metrics import cost_recorded
from llmq.protocol import JobStatus

PENDING_COSTS = "llmq_pending_costs"  # Session.info: (model, currency, cost) not yet committed

IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class Load:
    """What a key has in flight and has spent, for its limits."""

    jobs_in_flight: int  # queued or running
    tokens_this_month: int  # prompt + completion tokens computed for it (cache hits are free)
    spent_this_month: Decimal = Decimal(0)  # in the deployment's currency, cache hits included


@dataclass
class Totals:
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt + completion, those answered from the completion cache
    cost: dict[str, Decimal] = field(default_factory=dict)  # per currency; priced rows only

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Totals") -> None:
        self.jobs += other.jobs
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        for currency, amount in other.cost.items():
            self.cost[currency] = self.cost.get(currency, Decimal(0)) + amount


# Many rows in one statement compiled once (insertmanyvalues), whatever their number.
_INSERT_USAGE = (
    pg_insert(Usage.__table__)
    .on_conflict_do_nothing()
    .returning(
        Usage.__table__.c.job_id,
        Usage.__table__.c.model,
        Usage.__table__.c.currency,
        Usage.__table__.c.cost,
    )
)


@dataclass(frozen=True)
class Charge:
    """A usage row's cost as stored (None: the model had no price)."""

    cost: Decimal | None
    currency: str | None


def insert_usage(session: Session, rows: list[dict[str, Any]]) -> dict[Any, Charge]:
    """Store finished jobs' usage rows (a job's second row is ignored); their cost is counted
    in the metrics when the session commits. Returns what each stored row was charged, by job
    id."""
    if not rows:
        return {}
    inserted = session.execute(_INSERT_USAGE, rows).all()
    for _, model, currency, cost in inserted:
        if cost is not None:
            charged(session, model, currency, cost)
    return {job_id: Charge(cost, currency) for job_id, _, currency, cost in inserted}


def charged(session: Session, model: str, currency: str, cost: Decimal) -> None:
    """Count a usage row's cost once the session commits."""
    session.info.setdefault(PENDING_COSTS, []).append((model, currency, cost))


@event.listens_for(Session, "after_commit")
def _count_costs(session: Session) -> None:
    for model, currency, cost in session.info.pop(PENDING_COSTS, ()):
        cost_recorded(model, currency, cost)


@event.listens_for(Session, "after_rollback")
def _drop_costs(session: Session) -> None:
    session.info.pop(PENDING_COSTS, None)


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
_SPENT_SINCE = (
    select(func.coalesce(func.sum(Usage.cost), 0))
    .where(
        Usage.owner == bindparam("owner"),
        Usage.created_at >= bindparam("since"),
        Usage.currency == bindparam("currency"),
    )
    .scalar_subquery()
)


@lru_cache(maxsize=8)
def _load_statement(count_jobs: bool, count_tokens: bool, count_spend: bool):
    return select(
        _JOBS_IN_FLIGHT if count_jobs else literal(0),
        _TOKENS_SINCE if count_tokens else literal(0),
        _SPENT_SINCE if count_spend else literal(0, Numeric()),
    )


def load(
    session: Session,
    owner: str,
    *,
    count_jobs: bool,
    since: datetime | None,
    spend_currency: str | None = None,
) -> Load:
    """One round trip: the owner's jobs queued or running (when `count_jobs`), and since
    `since` (when given) the tokens computed for it and, when `spend_currency` is given, what
    it spent in that currency."""
    count_spend = since is not None and spend_currency is not None
    if not count_jobs and since is None:
        return Load(0, 0)
    statement = _load_statement(count_jobs, since is not None, count_spend)
    params = {"owner": owner, "since": since, "currency": spend_currency}
    row = session.execute(statement, params).one()
    return Load(int(row[0]), int(row[1]), Decimal(row[2]))


def spent_since(session: Session, owner: str | None, since: datetime, currency: str) -> Decimal:
    """What the owner's jobs cost in `currency` since `since`, cache hits included."""
    spent = session.scalar(
        select(func.coalesce(func.sum(Usage.cost), 0)).where(
            _owned_by(Usage.owner, owner), Usage.created_at >= since, Usage.currency == currency
        )
    )
    return Decimal(spent or 0)


def tokens_since(session: Session, owner: str | None, since: datetime) -> int:
    """Prompt + completion tokens computed for the owner (not cache hits) since `since`."""
    used = session.scalar(
        select(func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0)).where(
            _owned_by(Usage.owner, owner), Usage.created_at >= since, ~Usage.cached
        )
    )
    return int(used or 0)


def _totals_columns():
    """The totals of a group of rows of one currency (or none): the last two columns are the
    currency and the cost."""
    cached_tokens = func.sum(Usage.prompt_tokens + Usage.completion_tokens).filter(Usage.cached)
    return (
        func.count(),
        func.sum(Usage.prompt_tokens),
        func.sum(Usage.completion_tokens),
        func.coalesce(cached_tokens, 0),
        Usage.currency,
        func.sum(Usage.cost),
    )


def _totals(row) -> Totals:
    *tokens, currency, cost = row
    totals = Totals(*(int(value or 0) for value in tokens))
    if currency is not None and cost is not None:
        totals.cost[currency] = Decimal(cost)
    return totals


def _merged(keyed_rows) -> dict:
    """Rows grouped by (key..., currency) merged into one Totals per key, in their order."""
    merged: dict = {}
    for key, totals in keyed_rows:
        merged.setdefault(key, Totals()).add(totals)
    return merged


def by_model_and_day(
    session: Session, owner: str | None, start: datetime, end: datetime
) -> list[tuple[str, date, Totals]]:
    """The owner's usage in [start, end), per model and UTC day."""
    day = func.date(func.timezone("UTC", Usage.created_at), type_=Date)
    rows = session.execute(
        select(Usage.model, day.label("day"), *_totals_columns())
        .where(_owned_by(Usage.owner, owner), Usage.created_at >= start, Usage.created_at < end)
        .group_by(Usage.model, day, Usage.currency)
        .order_by(day, Usage.model)
    )
    merged = _merged(((row[0], row[1]), _totals(row[2:])) for row in rows)
    return [(model, day, totals) for (model, day), totals in merged.items()]


def by_owner(session: Session, start: datetime, end: datetime) -> list[tuple[str | None, Totals]]:
    """Everyone's usage in [start, end), per owner (an API key's id), most tokens first."""
    rows = session.execute(
        select(Usage.owner, *_totals_columns())
        .where(Usage.created_at >= start, Usage.created_at < end)
        .group_by(Usage.owner, Usage.currency)
    )
    merged = _merged((row[0], _totals(row[1:])) for row in rows)
    # Postgres's order: most tokens first, then by owner, no owner last.
    return sorted(
        merged.items(),
        key=lambda item: (-item[1].total_tokens, item[0] is None, item[0] or ""),
    )


def cost_of_jobs(session: Session, job_ids: list) -> dict[str, Decimal]:
    """What the jobs cost, per currency (empty when none was priced)."""
    rows = session.execute(
        select(Usage.currency, func.sum(Usage.cost))
        .where(Usage.job_id.in_(job_ids), Usage.cost.is_not(None))
        .group_by(Usage.currency)
    )
    return {currency: Decimal(cost) for currency, cost in rows}
