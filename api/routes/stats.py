"""Latency percentiles, throughput, tokens and errors per model, for people rather than
Prometheus: computed in Postgres over the jobs submitted in a recent window."""

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import RegistryDep, SessionDep
from api.schemas.jobs import (
    LatencyPublic,
    ModelStatsPublic,
    PercentilesPublic,
    StatsPublic,
    ThroughputPublic,
    TokensPublic,
    costs_public,
)
from db.queries.stats import ModelStats, Percentiles, window_stats
from llmq.protocol import JobStatus

router = APIRouter(prefix="/v1/stats", tags=["stats"])

MAX_WINDOW_S = 30 * 86_400


def percentiles_public(values: Percentiles) -> PercentilesPublic:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return PercentilesPublic(
        p50=rounded(values.p50),
        p90=rounded(values.p90),
        p95=rounded(values.p95),
        p99=rounded(values.p99),
    )


def empty_stats(model: str) -> ModelStats:
    nothing = Percentiles.from_values(None)
    return ModelStats(
        model=model,
        jobs_by_status={status.value: 0 for status in JobStatus},
        end_to_end_ms=nothing,
        queue_wait_ms=nothing,
        time_to_first_token_ms=nothing,
        time_per_output_token_ms=nothing,
        prompt_tokens=0,
        completion_tokens=0,
        errors_by_category={},
    )


def model_stats_public(stats: ModelStats, window_s: int) -> ModelStatsPublic:
    succeeded = stats.jobs_by_status[JobStatus.SUCCEEDED.value]
    return ModelStatsPublic(
        model=stats.model,
        jobs={"submitted": stats.submitted, **stats.jobs_by_status},
        latency_ms=LatencyPublic(
            end_to_end=percentiles_public(stats.end_to_end_ms),
            queue_wait=percentiles_public(stats.queue_wait_ms),
            time_to_first_token=percentiles_public(stats.time_to_first_token_ms),
            time_per_output_token=percentiles_public(stats.time_per_output_token_ms),
        ),
        throughput=ThroughputPublic(
            jobs_per_s=round(succeeded / window_s, 6),
            completion_tokens_per_s=round(stats.completion_tokens / window_s, 6),
        ),
        tokens=TokensPublic(
            prompt=stats.prompt_tokens,
            completion=stats.completion_tokens,
            total=stats.prompt_tokens + stats.completion_tokens,
        ),
        cost=costs_public(stats.cost),
        errors=stats.errors_by_category,
    )


@router.get("", response_model=StatsPublic)
def read_stats(
    session: SessionDep,
    registry: RegistryDep,
    window_s: Annotated[int, Query(ge=1, le=MAX_WINDOW_S)] = 3600,
    model: Annotated[str | None, Query(max_length=200)] = None,
) -> StatsPublic:
    """Per model, over the jobs submitted in the last `window_s` seconds: p50/p90/p95/p99 of
    end-to-end latency, queue wait, time to first token and time per output token (ms),
    throughput, token totals, cost and errors by category. Every configured model is listed."""
    window = window_stats(session, window_s, model)
    found = {stats.model: stats for stats in window.models}
    wanted = [model] if model is not None else registry.ids
    for model_id in wanted:
        found.setdefault(model_id, empty_stats(model_id))
    return StatsPublic(
        window_s=window_s,
        since=window.since,
        data=[model_stats_public(found[m], window_s) for m in sorted(found)],
    )
