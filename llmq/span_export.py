"""Span export in a child process, so that sending spans never holds the GIL the job path needs.

ChildProcessExporter stands where the OTLP exporter would (behind the SDK's BatchSpanProcessor):
it encodes each batch as an OTLP/protobuf export request (llmq/otlp_wire.py, a fraction of what
the SDK's encoder costs) and writes it to a child process (`python -m llmq.span_export`), which
sends it with the SDK's own OTLP/HTTP exporter, configured by the same OTEL_EXPORTER_OTLP_*
variables it inherits (endpoint, headers, timeout, compression, certificates), with its retries.

Tracing never fails the job path: a batch the child cannot take (it exited) is dropped with a
log line and a new child starts with the next batch. The child exits when its input closes
(this process ended or shut tracing down) after exporting what it was sent.
"""

import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, NamedTuple

import structlog
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState

from llmq.otlp_wire import RequestEncoder

log = structlog.get_logger(__name__)

_LENGTH = struct.Struct("!I")  # each frame: its length, then an export request
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK  # the parent (a link's span) is remote


class ChildProcessExporter(SpanExporter):
    """Hands span batches, encoded, to a child process that sends them over OTLP/HTTP."""

    def __init__(self) -> None:
        self._encoder = RequestEncoder()
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        request = self._encoder.encode(spans)
        with self._lock:
            try:
                _write(self._started().stdin, request)
                return SpanExportResult.SUCCESS
            except OSError as exc:  # the child exited: a new one takes the next batch
                log.warning(
                    "span export process lost; batch dropped", spans=len(spans), error=str(exc)
                )
                self._child = None
                return SpanExportResult.FAILURE

    def _started(self) -> subprocess.Popen:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "llmq.span_export"], stdin=subprocess.PIPE
            )
        return self._child

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if self._child is not None and self._child.stdin is not None:
                self._child.stdin.flush()
        return True

    def shutdown(self) -> None:
        """Close the child's input and let it export what it holds."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()
            child.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()


def _write(stream: IO[bytes] | None, frame: bytes) -> None:
    assert stream is not None
    stream.write(_LENGTH.pack(len(frame)) + frame)
    stream.flush()


# -- the child process --------------------------------------------------------------------------


def main() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)* itself
    send = _sender(exporter)
    try:
        while (request := _read(sys.stdin.buffer)) is not None:
            send(request)
    finally:
        exporter.shutdown()


def _sender(exporter) -> Callable[[bytes], object]:
    """How the child sends an encoded request: through the exporter's HTTP client (compression,
    retries, backoff), which takes encoded requests; where an exporter version has no such
    client, the request's spans go through the exporter's own encoder again."""
    client = getattr(exporter, "_client", None)
    if callable(getattr(client, "export", None)):
        return client.export
    return lambda request: exporter.export(spans_in(ExportTraceServiceRequest.FromString(request)))


def _read(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    body = stream.read(length)
    return None if len(body) < length else body


class ExportedContext(NamedTuple):
    """A span context as the SDK's OTLP encoder reads it."""

    trace_id: int
    span_id: int
    is_remote: bool
    trace_state: TraceState | None


class ExportedSpan(NamedTuple):
    """A span as the SDK's OTLP encoder (`encode_spans`) reads it."""

    name: str
    context: ExportedContext
    parent: ExportedContext | None
    resource: Resource
    attributes: dict
    events: list[Event]
    links: list[Link]
    kind: SpanKind
    status: Status
    start_time: int
    end_time: int
    instrumentation_scope: InstrumentationScope
    dropped_attributes: int
    dropped_events: int
    dropped_links: int

    def get_span_context(self) -> ExportedContext:
        return self.context


def spans_in(request: ExportTraceServiceRequest) -> list[ExportedSpan]:
    """The spans of an export request, for the SDK's encoder."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = Resource(
            _attributes(resource_spans.resource.attributes), resource_spans.schema_url or None
        )
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope
            instrumentation = InstrumentationScope(
                scope.name,
                scope.version or None,
                scope_spans.schema_url or None,
                _attributes(scope.attributes),
            )
            spans.extend(_span(s, resource, instrumentation) for s in scope_spans.spans)
    return spans


def _span(span, resource: Resource, scope: InstrumentationScope) -> ExportedSpan:
    context = ExportedContext(
        int.from_bytes(span.trace_id, "big"),
        int.from_bytes(span.span_id, "big"),
        False,
        TraceState([tuple(e.split("=", 1)) for e in span.trace_state.split(",")])
        if span.trace_state
        else None,
    )
    parent = None
    if span.parent_span_id:
        remote = bool(span.flags & _IS_REMOTE)
        parent = ExportedContext(
            context.trace_id, int.from_bytes(span.parent_span_id, "big"), remote, None
        )
    links = [
        Link(
            ExportedContext(
                int.from_bytes(link.trace_id, "big"),
                int.from_bytes(link.span_id, "big"),
                bool(link.flags & _IS_REMOTE),
                None,
            ),
            _attributes(link.attributes),
        )
        for link in span.links
    ]
    return ExportedSpan(
        span.name,
        context,
        parent,
        resource,
        _attributes(span.attributes),
        [Event(e.name, _attributes(e.attributes), e.time_unix_nano) for e in span.events],
        links,
        SpanKind(span.kind - 1),
        Status(StatusCode(span.status.code), span.status.message or None),
        span.start_time_unix_nano,
        span.end_time_unix_nano,
        scope,
        span.dropped_attributes_count,
        span.dropped_events_count,
        span.dropped_links_count,
    )


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


def _value(value: AnyValue):
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


if __name__ == "__main__":
    main()
