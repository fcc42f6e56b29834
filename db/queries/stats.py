"""Per-model figures over a recent window, computed in Postgres: latency percentiles, token
totals, and job counts by status and by error category.

The window holds the jobs submitted in it (`jobs.created_at`, which is indexed). Latencies are
those of its succeeded jobs, except queue wait, which every job that started has:
- end to end: submitted → finished;
- queue wait: submitted → first started by a worker;
- time to first token: handed to the engine → first token (`job_results`);
- time per output token: the time after the first token over the tokens after the first.
Percentiles are continuous (`percentile_cont`: linear interpolation between the two nearest
values), in milliseconds; NULL when no job has the figure. Cost is that of the window's
finished jobs, as their usage rows hold it, per currency.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.orm import Session

from db.tables import Job, JobResult, Usage
from llmq.protocol import JobStatus

PERCENTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def from_values(cls, values: list[float | None] | None) -> "Percentiles":
        return cls(*(values or [None] * len(PERCENTILES)))


@dataclass(frozen=True)
class ModelStats:
    model: str
    jobs_by_status: dict[str, int]
    end_to_end_ms: Percentiles
    queue_wait_ms: Percentiles
    time_to_first_token_ms: Percentiles
    time_per_output_token_ms: Percentiles
    prompt_tokens: int
    completion_tokens: int
    errors_by_category: dict[str, int]
    cost: dict[str, Decimal] = field(default_factory=dict)  # per currency

    @property
    def submitted(self) -> int:
        return sum(self.jobs_by_status.values())


@dataclass(frozen=True)
class WindowStats:
    since: datetime
    models: list[ModelStats]


def _milliseconds(interval: ColumnElement) -> ColumnElement[float]:
    return cast(func.extract("epoch", interval), Float) * 1000


def _percentiles(value: ColumnElement) -> ColumnElement:
    """All of PERCENTILES in one aggregate; rows whose value is NULL are left out."""
    return func.percentile_cont(array(PERCENTILES)).within_group(value)


def window_stats(session: Session, window_s: float, model: str | None = None) -> WindowStats:
    """Figures for each model that had jobs submitted in the last `window_s` seconds."""
    since = session.scalar(select(func.now() - timedelta(seconds=window_s)))
    in_window = [Job.created_at >= since]
    if model is not None:
        in_window.append(Job.model == model)

    succeeded = Job.status == JobStatus.SUCCEEDED.value
    end_to_end = case((succeeded, _milliseconds(Job.finished_at - Job.created_at)))
    queue_wait = _milliseconds(Job.started_at - Job.created_at)
    first_token = JobResult.time_to_first_token_ms
    per_output_token = case(
        (
            JobResult.completion_tokens > 1,
            (JobResult.duration_ms - first_token) / (JobResult.completion_tokens - 1),
        )
    )
    statuses = list(JobStatus)
    rows = session.execute(
        select(
            Job.model,
            *(func.count().filter(Job.status == status.value) for status in statuses),
            _percentiles(end_to_end),
            _percentiles(queue_wait),
            _percentiles(first_token),
            _percentiles(per_output_token),
            func.coalesce(func.sum(JobResult.prompt_tokens), 0),
            func.coalesce(func.sum(JobResult.completion_tokens), 0),
        )
        .outerjoin(JobResult, JobResult.job_id == Job.id)
        .where(*in_window)
        .group_by(Job.model)
        .order_by(Job.model)
    ).all()

    errors: dict[str, dict[str, int]] = {}
    for job_model, category, count in session.execute(
        select(Job.model, Job.error_category, func.count())
        .where(*in_window, Job.status == JobStatus.FAILED.value)
        .group_by(Job.model, Job.error_category)
    ):
        errors.setdefault(job_model, {})[category or "unknown"] = count

    costs: dict[str, dict[str, Decimal]] = {}
    for job_model, currency, cost in session.execute(
        select(Job.model, Usage.currency, func.sum(Usage.cost))
        .join(Usage, Usage.job_id == Job.id)
        .where(*in_window, Usage.cost.is_not(None))
        .group_by(Job.model, Usage.currency)
    ):
        costs.setdefault(job_model, {})[currency] = Decimal(cost)

    models = []
    for row in rows:
        counts = row[1 : 1 + len(statuses)]
        e2e, wait, ttft, tpot, prompt_tokens, completion_tokens = row[1 + len(statuses) :]
        models.append(
            ModelStats(
                model=row[0],
                jobs_by_status={s.value: c for s, c in zip(statuses, counts, strict=True)},
                end_to_end_ms=Percentiles.from_values(e2e),
                queue_wait_ms=Percentiles.from_values(wait),
                time_to_first_token_ms=Percentiles.from_values(ttft),
                time_per_output_token_ms=Percentiles.from_values(tpot),
                prompt_tokens=int(prompt_tokens),
                completion_tokens=int(completion_tokens),
                errors_by_category=errors.get(row[0], {}),
                cost=costs.get(row[0], {}),
            )
        )
    return WindowStats(since, models)
