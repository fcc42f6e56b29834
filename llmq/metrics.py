"""Job outcome and cost metrics that more than one process records.

A job's final status is decided where its compare-and-set wins: a worker stores successes and
failures, the API stores cancellations. Each process counts the outcomes it decided, and
Prometheus adds the processes' series up, so `sum by (status)` sees every outcome once.
The completion cache's counters live here too, so that whichever side looks the cache up can
count its hits. So does cost: the process that writes a usage row counts its cost once the row
is committed (db/queries/usage.py), so `sum by (model, currency)` over the API and worker
processes is what the usage table holds; a collector that read the table at scrape time would
report the same total from every API process, and sums would double it.
"""

from decimal import Decimal

from prometheus_client import Counter, disable_created_metrics

# The `_created` series double what every scrape carries and no panel or alert reads them.
disable_created_metrics()

JOBS_FINISHED = Counter(
    "llmq_jobs_finished_total", "Jobs that reached a final status", ["model", "status"]
)
JOBS_FAILED = Counter(
    "llmq_jobs_failed_total", "Failed jobs by error category", ["model", "category"]
)
CACHE_HITS = Counter(
    "llmq_cache_hits_total", "Completions answered from the completion cache", ["model"]
)
CACHE_MISSES = Counter(
    "llmq_cache_misses_total", "Completion cache look-ups that found nothing", ["model"]
)

COST = Counter(
    "llmq_cost_total",
    "What finished jobs cost at their model's price when they finished",
    ["model", "currency"],
)


def job_finished(model: str, status: str, count: int = 1) -> None:
    """Count jobs that this process moved to a final status other than failed."""
    if count:
        JOBS_FINISHED.labels(model, status).inc(count)


def job_failed(model: str, category: str) -> None:
    JOBS_FINISHED.labels(model, "failed").inc()
    JOBS_FAILED.labels(model, category).inc()


def cost_recorded(model: str, currency: str, amount: Decimal) -> None:
    COST.labels(model, currency).inc(float(amount))
