"""The API's Prometheus metrics: HTTP traffic and submitted jobs, counted as they happen, and the
figures read when Prometheus scrapes: each queue's depth (Redis) and its live workers (the
LiveQueues poller), and the Batch API's batches and open jobs (Postgres). Workers serve their
own metrics (workers/metrics.py)."""

from collections.abc import Iterator

import structlog
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis, RedisError
from sqlalchemy.exc import SQLAlchemyError

from api.fleet.live_workers import LiveQueues
from api.fleet.queues import priority_lists
from api.fleet.upstreams import STATE_VALUES, UpstreamBreakers
from db.queries import batches as batch_queries
from db.session import session_scope
from llmq.protocol import JOB_IDS_HEADER
from llmq.registry import Registry

log = structlog.get_logger(__name__)

HTTP_REQUESTS = Counter(
    "llmq_http_requests_total",
    "HTTP requests by route template, method and status code",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "llmq_http_request_duration_seconds",
    "Time from receiving a request to the end of its response (a stream's whole length)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
JOBS_SUBMITTED = Counter(
    "llmq_jobs_submitted_total", "Jobs stored and sent to a queue", ["model", "queue"]
)


def job_submitted(model: str, queue: str) -> None:
    JOBS_SUBMITTED.labels(model, queue).inc()


def request_served(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_DURATION.labels(method, route).observe(seconds)


COUNT_JOBS_SCRIPT = f"""
local jobs = 0
for _, key in ipairs(KEYS) do
    for _, raw in ipairs(redis.call('LRANGE', key, 0, -1)) do
        local ok, message = pcall(cjson.decode, raw)
        local ids = ok and type(message) == 'table' and type(message.headers) == 'table'
            and message.headers['{JOB_IDS_HEADER}']
        jobs = jobs + (type(ids) == 'table' and #ids or 1)
    end
end
return jobs
"""


class QueueCollector(Collector):
    """Queue depth and live workers for every configured `llmq.<model>.<device>` queue, read at
    scrape time so that they are never stale, and zero for a queue nobody consumes."""

    def __init__(self, registry: Registry, live: LiveQueues, redis: Redis) -> None:
        self.registry = registry
        self.live = live
        self.redis = redis
        # A group message carries several jobs: counted inside Redis, so the messages do not
        # travel to be counted.
        self._count_jobs = redis.register_script(COUNT_JOBS_SCRIPT)

    @staticmethod
    def families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "llmq_queue_depth",
            "Jobs waiting in the queue (not yet taken by a worker)",
            labels=["model", "queue"],
        )
        workers = GaugeMetricFamily(
            "llmq_live_workers",
            "Workers that answered the last broadcast as consumers of the queue",
            labels=["model", "queue"],
        )
        return depth, workers

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self.families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth, workers = self.families()
        queues = [
            (spec.id, spec.queue(device))
            for spec in self.registry.models
            for device in spec.devices
        ]
        for model, queue in queues:
            workers.add_metric([model, queue], self.live.consumers.get(queue, 0))
        yield workers
        try:
            # kombu keeps one Redis list per priority step of a queue.
            lengths = [self._count_jobs(keys=priority_lists(queue)) for _, queue in queues]
        except RedisError as exc:  # no figure is better than a wrong zero
            log.warning("queue depth unavailable", error=str(exc))
            return
        for (model, queue), length in zip(queues, lengths, strict=True):
            depth.add_metric([model, queue], length)
        yield depth


class UpstreamCollector(Collector):
    """Each remote model's upstream circuit breaker, as every worker of it shares it."""

    def __init__(self, breakers: UpstreamBreakers) -> None:
        self.breakers = breakers

    @staticmethod
    def family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "llmq_upstream_circuit_breaker_state",
            "A remote model's upstream breaker: 0 closed, 1 half-open, 2 open",
            labels=["model"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self.family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self.family()
        for model, state in self.breakers.states().items():
            if state in STATE_VALUES:
                family.add_metric([model], STATE_VALUES[state])
        yield family


class BatchCollector(Collector):
    """Batch API progress: batches by status, and their jobs queued or running per model."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    @staticmethod
    def families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        batches = GaugeMetricFamily(
            "llmq_batches", "Batch API batches by status", labels=["status"]
        )
        jobs = GaugeMetricFamily(
            "llmq_batch_jobs_open",
            "Jobs of Batch API lines queued or running (the Batch driver's window)",
            labels=["model", "status"],
        )
        return batches, jobs

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self.families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        batches, jobs = self.families()
        try:
            with session_scope(self.database_url) as session:
                by_status = batch_queries.batches_by_status(session)
                open_jobs = batch_queries.open_batch_jobs(session)
        except SQLAlchemyError as exc:
            log.warning("batch figures unavailable", error=str(exc))
            return
        for status, count in sorted(by_status.items()):
            batches.add_metric([status], count)
        for (model, status), count in sorted(open_jobs.items()):
            jobs.add_metric([model, status], count)
        yield batches
        yield jobs


def scrape_registry(
    registry: Registry,
    live: LiveQueues,
    redis_url: str,
    database_url: str,
    breakers: UpstreamBreakers,
) -> CollectorRegistry:
    """The app's scrape-time collectors, kept apart from the process-wide registry so that each
    app (tests build several) reports its own queues."""
    scraped = CollectorRegistry()
    redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    scraped.register(QueueCollector(registry, live, redis))
    scraped.register(BatchCollector(database_url))
    scraped.register(UpstreamCollector(breakers))
    return scraped


def exposition(scraped: CollectorRegistry) -> bytes:
    """The text the /metrics endpoint serves: process-wide metrics, then the app's queues."""
    return generate_latest(REGISTRY) + generate_latest(scraped)
