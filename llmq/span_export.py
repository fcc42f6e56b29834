"""Span export in a child process, so that encoding spans never holds the GIL the job path needs.

The SDK's OTLP exporter builds each span's protobuf attribute by attribute in Python: profiled
under the one-token job benchmark with every job traced, that encoding was a large share of the
extra GIL time tracing costs the API and the worker. ChildProcessExporter
stands where the OTLP exporter would (behind the SDK's BatchSpanProcessor): it flattens each
batch to plain tuples, pickles it and writes it to a child process (`python -m
llmq.span_export`), which rebuilds the spans and exports them with the SDK's own OTLP exporter,
configured by the same OTEL_EXPORTER_OTLP_* variables it inherits.

Tracing never fails the job path: a batch the child cannot take (it exited) is dropped with a
log line and a new child starts with the next batch. The child exits when its input closes
(this process ended or shut tracing down) after exporting what it was sent.
"""

import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any, NamedTuple

import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState

log = structlog.get_logger(__name__)

_LENGTH = struct.Struct("!I")  # each frame: its length, then a pickle

Flat = tuple  # a span as plain values (see _flat)


class ChildProcessExporter(SpanExporter):
    """Hands span batches to a child process that encodes and exports them over OTLP/HTTP."""

    def __init__(self, resource: Resource) -> None:
        self._resource = (dict(resource.attributes), resource.schema_url)
        self._child: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        frame = pickle.dumps([_flat(span) for span in spans], pickle.HIGHEST_PROTOCOL)
        with self._lock:
            try:
                _write(self._started().stdin, frame)
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
            _write(self._child.stdin, pickle.dumps(self._resource, pickle.HIGHEST_PROTOCOL))
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


def _context(context: SpanContext | None) -> tuple | None:
    if context is None:
        return None
    state = tuple(context.trace_state.items()) if context.trace_state else ()
    return (context.trace_id, context.span_id, context.is_remote, int(context.trace_flags), state)


def _flat(span: ReadableSpan) -> Flat:
    scope = span.instrumentation_scope
    return (
        span.name,
        _context(span.context),
        _context(span.parent),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
        [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        span.status.status_code.value,
        span.status.description,
        None if scope is None else (scope.name, scope.version, scope.schema_url),
    )


# -- the child process --------------------------------------------------------------------------


class ExportedContext(NamedTuple):
    """A span context as the OTLP encoder reads it."""

    trace_id: int
    span_id: int
    is_remote: bool
    trace_state: TraceState | None


def _exported_context(flat: tuple | None) -> ExportedContext | None:
    if flat is None:
        return None
    trace_id, span_id, is_remote, _flags, state = flat
    return ExportedContext(trace_id, span_id, is_remote, TraceState(list(state)) if state else None)


class ExportedSpan:
    """A span rebuilt for the SDK's OTLP encoder (`encode_spans`), with what it reads and no
    more: a ReadableSpan would copy and check every attribute again, which the span passed
    already in the process that made it, at half the child's cost per span."""

    __slots__ = (
        "name", "context", "parent", "resource", "attributes", "events", "links", "kind",
        "status", "start_time", "end_time", "instrumentation_scope",
    )  # fmt: skip
    dropped_attributes = dropped_events = dropped_links = 0  # the making process's checks

    def __init__(self, flat: Flat, resource: Resource, scope: InstrumentationScope | None):
        (self.name, context, parent, kind, self.start_time, self.end_time, self.attributes,
         events, links, code, description, _) = flat  # fmt: skip
        self.context, self.parent = _exported_context(context), _exported_context(parent)
        self.resource, self.instrumentation_scope = resource, scope
        self.kind = SpanKind(kind)
        self.status = Status(StatusCode(code), description)
        self.events = [Event(n, a, t) for n, a, t in events]
        self.links = [Link(_exported_context(c), a) for c, a in links]

    def get_span_context(self) -> ExportedContext | None:
        return self.context


def rebuild(
    flat: Flat, resource: Resource, scopes: dict[tuple, InstrumentationScope]
) -> ExportedSpan:
    """The span `_flat` made, for the SDK's OTLP encoder."""
    scope = flat[-1]
    if scope is not None and scope not in scopes:
        scopes[scope] = InstrumentationScope(*scope)
    return ExportedSpan(flat, resource, None if scope is None else scopes[scope])


def _read(stream: IO[bytes]) -> Any | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    body = stream.read(length)
    return None if len(body) < length else pickle.loads(body)


def main() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    stream = sys.stdin.buffer
    first = _read(stream)
    if first is None:
        return
    attributes, schema_url = first
    resource = Resource(attributes, schema_url)
    exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)* itself
    scopes: dict[tuple, InstrumentationScope] = {}
    try:
        while (batch := _read(stream)) is not None:
            exporter.export([rebuild(flat, resource, scopes) for flat in batch])
    finally:
        exporter.shutdown()


if __name__ == "__main__":
    main()
