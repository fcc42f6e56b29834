"""A remote model's upstream, as its workers see it: requests by outcome, their latency and time
to first text, the breaker's trips. The breaker's current state is the API's gauge
(api/metrics.py), read from Redis, where every worker's breaker keeps it."""

import pybreaker
from prometheus_client import Counter, Histogram

from workers.metrics import SECONDS

UPSTREAM_REQUESTS = Counter(
    "llmq_upstream_requests_total",
    "Requests sent to a remote model's upstream, by outcome: ok, refused (the request's fault), "
    "error (an invalid answer), transient (retried while the job's deadline allows), cancelled",
    ["model", "outcome"],
)
UPSTREAM_SECONDS = Histogram(
    "llmq_upstream_request_seconds",
    "One upstream request, sent → its stream ended (or failed)",
    ["model"],
    buckets=SECONDS,
)
UPSTREAM_FIRST_TEXT = Histogram(
    "llmq_upstream_time_to_first_text_seconds",
    "One upstream request, sent → its first text",
    ["model"],
    buckets=(0.001, 0.0025, *SECONDS),
)
BREAKER_TRANSITIONS = Counter(
    "llmq_upstream_breaker_transitions_total",
    "Circuit breaker state changes seen by this worker, by the state entered",
    ["model", "state"],
)


class BreakerMetrics(pybreaker.CircuitBreakerListener):
    def __init__(self, model: str) -> None:
        self.model = model

    def state_change(self, cb, old_state, new_state) -> None:
        BREAKER_TRANSITIONS.labels(self.model, new_state.name).inc()
