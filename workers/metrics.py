"""A worker's Prometheus metrics, served on its own port (LLMQ_WORKER_METRICS_PORT).

- the engine: decode steps, the batch size of each step, the sequences it holds;
- jobs, recorded when their outcome is stored: queue wait, time to first token, time per output
  token, end-to-end duration, prompt and completion tokens (llmq/metrics.py counts outcomes);
- the model: how long it took to load, and what it is (a model-info gauge).

Labels are the model and the queue (`llmq.<model>.<device>`), so one dashboard covers every
worker. Nothing here imports torch: Flower and the tests read these names without a model.
"""

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from llmq import metrics as outcomes
from llmq.settings import Settings
from workers.engine_jobs import GenerationOutput

if TYPE_CHECKING:
    from db.tables import Job
    from llmq.registry import ModelSpec
    from workers.host import ModelFacts

log = structlog.get_logger(__name__)

LABELS = ["model", "queue"]
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

QUEUE_WAIT = Histogram(
    "llmq_job_queue_wait_seconds",
    "Submitted → first started by a worker",
    LABELS,
    buckets=(*SECONDS, 1800, 3600),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmq_job_time_to_first_token_seconds",
    "Handed to the engine → first token",
    LABELS,
    buckets=(0.001, 0.0025, *SECONDS),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "llmq_job_time_per_output_token_seconds",
    "Time after the first token over the tokens after the first",
    LABELS,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
JOB_DURATION = Histogram(
    "llmq_job_duration_seconds",
    "Submitted → result stored, for succeeded jobs",
    LABELS,
    buckets=(*SECONDS, 1800, 3600),
)
PROMPT_TOKENS = Counter("llmq_prompt_tokens_total", "Prompt tokens of succeeded jobs", LABELS)
COMPLETION_TOKENS = Counter(
    "llmq_completion_tokens_total", "Generated tokens of succeeded jobs", LABELS
)
BATCH_SIZE = Histogram(
    "llmq_batch_size",
    "Sequences decoded together, observed at every decode step",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
FORWARD_PASS = Histogram(
    "llmq_forward_pass_seconds",
    "One forward pass of the model, by kind: prefill (newcomers joining a batch), decode (one "
    "step of a running batch), score (one pass of scoring rows). A pass that slows while its "
    "batch does not grow shares the machine's cores with other work",
    [*LABELS, "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PASS_KINDS = ("prefill", "decode", "score")
DECODE_STEPS = Counter("llmq_decode_steps_total", "Decode steps the engine ran", LABELS)
ACTIVE_SEQUENCES = Gauge(
    "llmq_active_sequences",
    "Sequences the engine holds: in the running batch or waiting for a place in it",
    LABELS,
)
MODEL_LOAD = Gauge(
    "llmq_model_load_seconds", "How long loading the model took", ["model", "device"]
)
MODEL_INFO = Gauge(
    "llmq_model_info",
    "A model this worker has loaded (always 1)",
    ["model", "queue", "device", "dtype", "revision"],
)
MODEL_MEMORY = Gauge(
    "llmq_model_memory_bytes",
    "Bytes of a loaded model's weights on its device",
    ["model", "device"],
)
MODEL_LOADS = Counter("llmq_model_loads_total", "Models this worker loaded", ["model"])
MODEL_EVICTIONS = Counter(
    "llmq_model_evictions_total",
    "Models this worker unloaded to make room for another (least recently used first)",
    ["model"],
)
MODELS_LOADED = Gauge("llmq_models_loaded", "Models this worker holds loaded now")
# The llmq_model_info labels of each loaded (model, device), to remove them when it unloads.
_model_info: dict[tuple[str, str], tuple[str, ...]] = {}


def serve_metrics(settings: Settings) -> None:
    """Serve /metrics from a daemon thread of this worker process, unless the port is 0.

    A port already taken (another worker on this host) leaves the worker running without an
    endpoint: a missing metric must not keep a model from serving."""
    port = settings.worker_metrics_port
    if port == 0:
        log.info("worker metrics endpoint off (LLMQ_WORKER_METRICS_PORT=0)")
        return
    try:
        start_http_server(port, addr=settings.worker_metrics_host)
    except OSError as exc:
        log.warning(
            "worker metrics endpoint not started; give each worker its own --metrics-port",
            port=port,
            error=str(exc),
        )
        return
    log.info("worker metrics served", url=f"http://{settings.worker_metrics_host}:{port}/metrics")


def model_loaded(spec: "ModelSpec", device: str, facts: "ModelFacts") -> None:
    """The facts come from the process that loaded the model: this one, or its engine process."""
    MODEL_LOAD.labels(spec.id, device).set(facts.load_seconds)
    info = (spec.id, spec.queue(device), device, facts.dtype, facts.revision)
    MODEL_INFO.labels(*info).set(1)
    _model_info[(spec.id, device)] = info
    MODEL_MEMORY.labels(spec.id, device).set(facts.memory_bytes)
    MODEL_LOADS.labels(spec.id).inc()


def model_unloaded(spec: "ModelSpec", device: str, engine: "EngineMetrics") -> None:
    """A model's gauges leave with it; its counters and histograms stay, as Prometheus wants."""
    for gauge, labels in ((MODEL_LOAD, (spec.id, device)), (MODEL_MEMORY, (spec.id, device))):
        with suppress(KeyError):
            gauge.remove(*labels)
    info = _model_info.pop((spec.id, device), None)
    if info is not None:
        MODEL_INFO.remove(*info)
    engine.close()


def model_evicted(model: str) -> None:
    MODEL_EVICTIONS.labels(model).inc()


def models_loaded(count: int) -> None:
    MODELS_LOADED.set(count)


class EngineObserver(Protocol):
    """What the engine tells as it runs: EngineMetrics, or (in an engine process) the report
    that carries it to the worker process (workers/engine_process.py)."""

    def decode_step(self, batch_size: int) -> None: ...

    def forward_pass(self, kind: str, seconds: float) -> None: ...


class EngineMetrics:
    """The engine's hooks, with their label values bound once: they run at every decode step.

    With the engine in a process of its own, the worker process's EngineProcess holds these and
    replays what the engine process observed (it reports each engine cycle's observations)."""

    def __init__(
        self, model: str, queue: str, active_job_ids: Callable[[], Collection[uuid.UUID]]
    ) -> None:
        labels = self._labels = (model, queue)
        self._batch_size = BATCH_SIZE.labels(*labels)
        self._decode_steps = DECODE_STEPS.labels(*labels)
        self._passes = {kind: FORWARD_PASS.labels(*labels, kind) for kind in PASS_KINDS}
        # Read when scraped, so the decode loop pays nothing for it.
        ACTIVE_SEQUENCES.labels(*labels).set_function(lambda: len(active_job_ids()))

    def close(self) -> None:
        """The engine is gone: its sequences gauge must not read it any more."""
        with suppress(KeyError):
            ACTIVE_SEQUENCES.remove(*self._labels)

    def decode_step(self, batch_size: int) -> None:
        self._batch_size.observe(batch_size)
        self._decode_steps.inc()

    def forward_pass(self, kind: str, seconds: float) -> None:
        self._passes[kind].observe(seconds)


@dataclass(frozen=True)
class _Claimed:
    model: str
    queue: str
    age_at_claim_s: float  # how long after its submission the job was claimed
    claimed_at: float  # time.monotonic()


class _ClaimedJobs:
    """Jobs claimed by this process, until their outcome is stored. Bounded: a job that ends
    with no outcome of its own (cancelled, or handed to another worker) leaves its entry behind
    until newer ones push it out."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._jobs: OrderedDict[uuid.UUID, _Claimed] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job_id: uuid.UUID, claimed: _Claimed) -> None:
        with self._lock:
            self._jobs[job_id] = claimed
            while len(self._jobs) > self.limit:
                self._jobs.popitem(last=False)

    def pop(self, job_id: uuid.UUID) -> _Claimed | None:
        with self._lock:
            return self._jobs.pop(job_id, None)


_claimed = _ClaimedJobs()


def job_started(job: "Job") -> None:
    """A job was claimed: its queue wait is known (first attempts only, as a redelivered job
    was already counted), and its end-to-end clock keeps running."""
    if job.attempts == 1 and job.started_at is not None:
        # Both timestamps come from Postgres, so the worker's clock does not matter.
        age_s = (job.started_at - job.created_at).total_seconds()
        QUEUE_WAIT.labels(job.model, job.queue).observe(max(0.0, age_s))
    else:
        age_s = (datetime.now(UTC) - job.created_at).total_seconds()
    _claimed.add(job.id, _Claimed(job.model, job.queue, max(0.0, age_s), time.monotonic()))


def job_succeeded(job_id: uuid.UUID, output: GenerationOutput) -> None:
    """The job's result is stored."""
    claimed = _claimed.pop(job_id)
    if claimed is None:
        return
    labels = (claimed.model, claimed.queue)
    outcomes.job_finished(claimed.model, "succeeded")
    PROMPT_TOKENS.labels(*labels).inc(output.prompt_tokens)
    COMPLETION_TOKENS.labels(*labels).inc(output.completion_tokens)
    first_token_ms = output.time_to_first_token_ms
    if first_token_ms is not None:
        TIME_TO_FIRST_TOKEN.labels(*labels).observe(first_token_ms / 1000)
        if output.completion_tokens > 1:
            per_token_ms = (output.duration_ms - first_token_ms) / (output.completion_tokens - 1)
            TIME_PER_OUTPUT_TOKEN.labels(*labels).observe(per_token_ms / 1000)
    elapsed_s = claimed.age_at_claim_s + time.monotonic() - claimed.claimed_at
    JOB_DURATION.labels(*labels).observe(elapsed_s)


def job_failed(job_id: uuid.UUID, category: str) -> None:
    """The job's failure is stored."""
    claimed = _claimed.pop(job_id)
    if claimed is not None:
        outcomes.job_failed(claimed.model, category)
