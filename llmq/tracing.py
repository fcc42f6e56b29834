"""Request tracing with OpenTelemetry: set up once per process, off unless asked for.

Tracing is on when the standard variables ask for an exporter: OTEL_EXPORTER_OTLP_ENDPOINT
(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), or OTEL_TRACES_EXPORTER naming one ("otlp",
"otlp_proto_http", "console"); OTEL_SDK_DISABLED=true turns it off again. Everything else is
the SDK's: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_* and OTEL_BSP_*.
Sampling is OTEL_TRACES_SAMPLER's; unset, it is `parentbased_traceidratio` at the ratio in
OTEL_TRACES_SAMPLER_ARG (DEFAULT_RATIO without it).

Off, nothing is instrumented and no provider is installed: the job path asks `enabled()` (a
module flag) before building any span or context, and stores no trace context with its jobs.

A job's trace context travels in its row (`jobs.trace_context`, a W3C traceparent) as well as
in the Celery message headers, since one message carries several jobs and a job may be sent
again by the reconciler; the worker's spans for a job are children of the stored context.
Database, Redis and broker calls made outside any trace (the reconciler's sweeps, the
workers' group commits, heartbeats) start no trace of their own: see QuietBackground.
"""

import contextvars
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, sampling
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = structlog.get_logger(__name__)

DEFAULT_RATIO = 0.1
TRACER_NAME = "llmq"
EXPORTERS = ("otlp", "otlp_proto_http", "console")
# The libraries each process instruments. The API's database and Redis calls are made for one
# request each, and a worker's task runs and HTTP calls (a remote model's upstream requests) for
# its jobs. A worker's Postgres and Redis calls serve many jobs at once (claims, group commits,
# batched events) outside any trace, so they would start no span and only cost time: its own
# spans (llmq.claim, llmq.result.write, llmq.stream.publish) time them for each job.
API_LIBRARIES = ("celery", "httpx", "redis", "sqlalchemy")
WORKER_LIBRARIES = ("celery", "httpx")

_enabled = False
_tracer: trace.Tracer | None = None
# What spans recorded after the fact (see `finished_span`) need: the provider's processors,
# resource and sampler, kept as configure_tracing made them.
_processors: list[SpanProcessor] = []
_resource: Resource | None = None
_sampler_in_use: sampling.Sampler | None = None
_scope = InstrumentationScope(TRACER_NAME)
_lock = threading.Lock()
_propagator = TraceContextTextMapPropagator()
# A trace id chosen by the caller for the next root span (an evaluation run's, a batch's).
_forced_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "llmq_forced_trace_id", default=None
)
# A request's sampling, decided as it arrives (`_head_sampled`): the trace id drawn for it, taken
# by its server span, or that it is not traced at all.
_head_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "llmq_head_trace_id", default=None
)
_request_dropped: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "llmq_request_dropped", default=False
)


def enabled() -> bool:
    """Whether this process traces: the one check the job path makes when tracing is off."""
    return _enabled


def requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters:
        return any(e in EXPORTERS for e in exporters)
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(service_name: str, libraries: Sequence[str] = API_LIBRARIES) -> bool:
    """Install the tracer provider, its exporters and the instrumentations of `libraries`, once
    per process, when the OTEL_* variables ask for traces; returns whether this process traces.
    `service_name` is used when OTEL_SERVICE_NAME is not set."""
    global _enabled
    with _lock:
        if _enabled or not requested():
            return _enabled
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        global _resource, _sampler_in_use
        _resource, _sampler_in_use = resource, QuietBackground(_sampler())
        provider = TracerProvider(
            resource=resource, sampler=_sampler_in_use, id_generator=_root_ids
        )
        for exporter in _exporters():
            _processors.append(BatchSpanProcessor(exporter))
            provider.add_span_processor(_processors[-1])
        trace.set_tracer_provider(provider)
        _instrument_libraries([name for name in libraries if name not in _disabled()])
        _enabled = True
    log.info("tracing on", service=service_name)
    return True


def _sampler() -> sampling.Sampler:
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name:
        return sampling._get_from_env_or_default()  # the SDK's reading of the standard pair
    ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        rate = float(ratio) if ratio else DEFAULT_RATIO
    except ValueError:
        rate = DEFAULT_RATIO
    return sampling.ParentBasedTraceIdRatio(min(max(rate, 0.0), 1.0))


def _exporters() -> list:
    names = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters = []
    for name in names:
        if name in ("otlp", "otlp_proto_http"):
            # OTLP over HTTP (protobuf), the protocol the specification defaults to, sent by the
            # SDK's exporter in a child process (llmq/span_export.py), which reads
            # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT and the rest itself.
            from llmq.span_export import ChildProcessExporter

            exporters.append(ChildProcessExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
    return exporters


def _disabled() -> set[str]:
    """The instrumentations an operator turned off, by the variable the SDK's auto-instrumentation
    reads (e.g. "redis,sqlalchemy")."""
    names = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return {name.strip() for name in names.split(",") if name.strip()}


def _instrument_libraries(libraries: Sequence[str]) -> None:
    if "celery" in libraries:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
    if "httpx" in libraries:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument()
    if "redis" in libraries:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().instrument()
    if "sqlalchemy" in libraries:
        import sqlalchemy.engine.base
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.instrumentation.utils import unwrap

        # Its declared range stops below SQLAlchemy 2.1, whose engine events it uses unchanged.
        SQLAlchemyInstrumentor().instrument(skip_dep_check=True)
        # Statements keep their spans; a "connect" span for each session's pool checkout (two
        # per job) would say only that a pooled connection was lent.
        unwrap(sqlalchemy.engine.base.Engine, "connect")


UNTRACED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def app_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry settings (`FastAPI(telemetry=...)`): a server span for each
    request, named by its route once it is routed, current in every middleware. It starts no
    span while no tracer provider is installed (tracing off). No spans for dependencies,
    endpoints and serialization (llmq.submit covers a job's acceptance), no OpenTelemetry
    metrics or logs (Prometheus and structlog have those), nothing for probes and scrapes, and
    nothing at all for a request the sampler drops (see `_head_sampled`)."""
    return {
        "tracing": "fastapi" not in _disabled(),
        "operation_spans": False,
        "metrics": False,
        "logs": False,
        "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS or not _head_sampled(scope),
    }


def _head_sampled(scope: dict) -> bool:
    """Whether a request is traced, decided as it arrives, before FastAPI's telemetry builds its
    server span's attributes, context and wrappers, which a dropped request would pay for all
    the same (with the default ratio, nine requests in ten). The sampler decides as it would
    for the server span: by the sampled flag of an incoming traceparent, or for a new trace on a
    trace id drawn here, which the server span then takes (`_IdGenerator`), so that a ratio
    sampler's verdict stands. A dropped request starts none of llmq's spans either
    (`request_traced`)."""
    if not _enabled:
        return True  # tracing off: FastAPI's telemetry starts nothing
    headers = dict(scope.get("headers", ()))
    parent_context = context_of(headers.get(b"traceparent", b"").decode("latin-1"))
    new_trace = parent_context is None
    if new_trace:  # decided with no parent, whatever is current here
        parent_context, trace_id = otel_context.Context(), _ids.generate_trace_id()
    else:
        trace_id = trace.get_current_span(parent_context).get_span_context().trace_id
    decision = _sampler_in_use.should_sample(
        parent_context, trace_id, "request", SpanKind.SERVER
    ).decision
    if not decision.is_sampled():
        _request_dropped.set(True)
        return False
    if new_trace:
        _head_trace_id.set(trace_id)
    return True


def request_traced() -> bool:
    """Whether llmq's own spans may start in this request: tracing is on and the request was not
    dropped as it arrived."""
    return _enabled and not _request_dropped.get()


def tracer() -> trace.Tracer:
    """llmq's tracer, got once: the SDK builds a new one on each get_tracer call (a third of
    what a worker's spans for a job cost)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


# -- trace context ----------------------------------------------------------------------------


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span when it is being recorded, else None."""
    if not _enabled:
        return None
    return traceparent_of(trace.get_current_span())


def traceparent_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """The context to start a span under from a stored traceparent; None when there is none
    (or tracing is off), so that no span is started."""
    if not _enabled or not traceparent:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


@contextmanager
def attached(traceparent: str | None) -> Iterator[None]:
    """Make a stored trace context current in this thread inside the block (for the Celery
    instrumentation's send of a job's message); with none, the block is untraced (see
    quiet_unless_traced)."""
    ctx = context_of(traceparent)
    if ctx is None:
        with quiet():
            yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextmanager
def quiet_unless_traced() -> Iterator[None]:
    """Inside the block, the library instrumentations do nothing unless the current span is
    recorded. They build their spans' names and attributes (a Redis command's text, a
    statement's database) before the sampler decides, so a request that is not sampled would
    pay for them all the same; their own switch turns them off instead (`bench.tracing
    --sampler always_off` measures what they cost)."""
    if not _enabled or trace.get_current_span().is_recording():
        yield
        return
    with quiet():
        yield


def quiet():
    """A context in which the library instrumentations start no spans (nothing when tracing
    is off): for work done for several traces at once, which gets llmq's own spans instead."""
    if not _enabled:
        return nullcontext()
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


# -- spans recorded after the fact ------------------------------------------------------------


def sampled_child(parent: SpanContext, name: str) -> SpanContext | None:
    """A new span's context under `parent` when the sampler records it (for a parent-based
    sampler: when the parent was sampled), else None; for spans made with `finished_span`."""
    if not _enabled or _sampler_in_use is None:
        return None
    decision = _sampler_in_use.should_sample(
        trace.set_span_in_context(trace.NonRecordingSpan(parent)), parent.trace_id, name
    ).decision
    if not decision.is_sampled():
        return None
    return SpanContext(
        parent.trace_id, _ids.generate_span_id(), False, parent.trace_flags, parent.trace_state
    )


def child_context(parent: SpanContext) -> SpanContext:
    """A new span's context under a span that `sampled_child` made."""
    return SpanContext(
        parent.trace_id, _ids.generate_span_id(), False, parent.trace_flags, parent.trace_state
    )


def finished_span(
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Hand a finished span, made from times recorded as the work went on, straight to the
    export processors. A worker's spans for a job are all made this way once the job has ended
    (workers/job_trace.py): the SDK's live spans, with their locks, sampler call and attribute
    checks, cost several times as much, and nothing runs inside these spans that would need them
    current."""
    status = Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET)
    span = ReadableSpan(
        name,
        context,
        parent,
        _resource,
        attributes,
        status=status,
        start_time=start_ns,
        end_time=max(end_ns, start_ns),
        instrumentation_scope=_scope,
    )
    for processor in _processors:
        processor.on_end(span)


class LaterSpan:
    """A span recorded once its work has ended (`finished_span`), for work inside which no other
    span starts: the SDK's live span, with its lock, processor calls, attribute checks and
    context switch, costs about four times as much. Attributes may be added until it ends."""

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None) -> None:
        self.name, self.context, self.parent = name, context, parent
        self.start_ns = time.time_ns()
        self.attributes: dict[str, Any] = {}

    @property
    def traceparent(self) -> str | None:
        return traceparent_of(trace.NonRecordingSpan(self.context))

    def end(self, error: str | None = None) -> None:
        finished_span(
            self.name,
            self.context,
            self.parent,
            self.start_ns,
            time.time_ns(),
            self.attributes or None,
            error,
        )


@contextmanager
def later_span(name: str) -> Iterator[LaterSpan | None]:
    """A LaterSpan for the block, under the current span (a new trace's root where there is
    none, as a live span would be), when the sampler records it; else None (tracing off, or the
    request dropped as it arrived). An error out of the block is its status."""
    span = _later_span(name) if request_traced() else None
    if span is None:
        yield None
        return
    try:
        yield span
    except BaseException as exc:
        span.end(f"{type(exc).__name__}: {exc}")
        raise
    span.end()


def _later_span(name: str) -> LaterSpan | None:
    parent = trace.get_current_span().get_span_context()
    if parent.is_valid:
        child = sampled_child(parent, name)
        return None if child is None else LaterSpan(name, child, parent)
    # The trace id drawn and sampled as the request arrived, as a live root span would take it.
    trace_id = _root_ids.generate_trace_id()
    decision = _sampler_in_use.should_sample(otel_context.Context(), trace_id, name).decision
    if not decision.is_sampled():
        return None
    root = SpanContext(trace_id, _ids.generate_span_id(), False, TraceFlags(TraceFlags.SAMPLED))
    return LaterSpan(name, root, None)


def record_child(
    traceparent: str | None,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: dict[str, Any] | None = None,
) -> None:
    """A finished span under a stored trace context, when its trace is sampled: each of the
    traces that one piece of work served (a transaction storing several requests' jobs) gets
    its own span of it."""
    if (contexts := sampled_child_of(traceparent, name)) is not None:
        parent, child = contexts
        finished_span(name, child, parent, start_ns, end_ns, attributes)


def sampled_child_of(traceparent: str | None, name: str) -> tuple[SpanContext, SpanContext] | None:
    """The span context a stored traceparent names and a new child's under it, when the
    sampler records the child; else None (no context stored, or tracing off)."""
    ctx = context_of(traceparent)
    if ctx is None:
        return None
    parent = trace.get_current_span(ctx).get_span_context()
    child = sampled_child(parent, name)
    return None if child is None else (parent, child)


def link_to(traceparent: str | None) -> list[Link]:
    ctx = context_of(traceparent)
    return [] if ctx is None else [Link(trace.get_current_span(ctx).get_span_context())]


def log_ids(_logger: Any, _name: str, event: dict) -> dict:
    """structlog processor: the current span's trace and span ids, when it is recorded."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid and ctx.trace_flags.sampled:
        event.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event.setdefault("span_id", f"{ctx.span_id:016x}")
    return event


# -- traces of evaluation runs and batches ------------------------------------------------------


@contextmanager
def collection_trace(name: str, collection_id: uuid.UUID | str, **attributes) -> Iterator[Span]:
    """A span in the one trace of an evaluation run or a batch: its trace id is derived from
    the collection's id, so that every sweep of every API process adds to the same trace, and
    the ratio sampler decides alike for all of them. Yields a non-recording span when off."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    trace_id = _trace_id_for(collection_id)
    reset = _forced_trace_id.set(trace_id)
    try:
        span_cm = tracer().start_as_current_span(name, context=otel_context.Context())
        span = span_cm.__enter__()
    finally:
        _forced_trace_id.reset(reset)
    try:
        if span.is_recording():
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        yield span
    finally:
        span_cm.__exit__(None, None, None)


@contextmanager
def linked_trace(name: str, collection: Span) -> Iterator[str | None]:
    """A new trace for one job of a run or batch, current inside the block, its root span
    linked to the collection's span; yields its traceparent for the job's row (None when the
    collection is not traced)."""
    if not _enabled or not collection.is_recording():
        yield None
        return
    link = Link(collection.get_span_context())
    root = tracer().start_as_current_span(name, context=otel_context.Context(), links=[link])
    with root as span:
        yield traceparent_of(span)


def _trace_id_for(collection_id: uuid.UUID | str) -> int:
    if isinstance(collection_id, uuid.UUID):
        return collection_id.int or 1
    return uuid.uuid5(uuid.NAMESPACE_URL, f"llmq:{collection_id}").int


class _IdGenerator(IdGenerator):
    """The SDK's random ids, except a trace id chosen for a collection's span or drawn for a
    request as it arrived."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _forced_trace_id.get()
        if forced is not None:
            return forced
        head = _head_trace_id.get()
        if head is not None:  # a request's, drawn as it arrived: its server span's, once
            _head_trace_id.set(None)
            return head
        return self._random.generate_trace_id()


_ids = RandomIdGenerator()
_root_ids = _IdGenerator()  # the provider's: a root span takes a collection's or request's id


class QuietBackground(sampling.Sampler):
    """A sampler that starts no trace at a client, producer or consumer span without a parent
    (a query of the reconciler, a group commit of a worker, a heartbeat's Redis call): only
    requests, and the spans llmq starts itself, begin traces. Others go to `inner`."""

    _QUIET = (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)

    def __init__(self, inner: sampling.Sampler) -> None:
        self.inner = inner
        self._drop = sampling.SamplingResult(sampling.Decision.DROP)

    def should_sample(
        self,
        parent_context,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes=None,
        links: Sequence[Link] | None = None,
        trace_state=None,
    ):
        if kind in self._QUIET:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid:
                return self._drop
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"QuietBackground{{{self.inner.get_description()}}}"
