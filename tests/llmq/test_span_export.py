"""Span export through a child process (llmq/span_export.py): spans are encoded as the SDK's
encoder would encode them (llmq/otlp_wire.py), what reaches an OTLP receiver is what the SDK
recorded, and a child that dies costs one batch, not tracing."""

import os
import time

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from llmq.otlp_wire import RequestEncoder
from llmq.span_export import ChildProcessExporter, _sender, spans_in
from tests.traces import Receiver


@pytest.fixture
def receiver(monkeypatch) -> Receiver:
    receiver = Receiver()
    # The child reads the endpoint as the SDK's exporter would, from the variables it inherits.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    yield receiver
    receiver.otlp.close()


def spans_of(exporter: ChildProcessExporter):
    provider = TracerProvider(resource=Resource({"service.name": "llmq-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("llmq", "1.0")
    linked = tracer.start_span("elsewhere")
    linked.end()
    with tracer.start_as_current_span(
        "llmq.job",
        kind=SpanKind.CONSUMER,
        attributes={"llmq.job_id": "j1", "llmq.attempt": 2, "flags": [True, False]},
        links=[Link(linked.get_span_context(), {"why": "collection"})],
    ) as job:
        job.add_event("first token", {"token_index": 0})
        with tracer.start_as_current_span("llmq.claim", start_time=1_000, end_on_exit=False) as c:
            c.end(end_time=2_000)
        job.set_status(Status(StatusCode.ERROR, "model_error"))
    return provider, linked, job


def every_kind_of_span():
    """Spans with every field the encoders write: two resources and scopes, each attribute
    type, events, links, a remote parent with a trace state, each status."""
    kept = InMemorySpanExporter()
    spans_of(kept)
    provider = TracerProvider(
        resource=Resource({"service.name": "other", "n": 3, "l": ["a", "b"]}, "https://s/1")
    )
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("lib", "2.0", schema_url="https://s/2", attributes={"a": 1})
    state = TraceState([("vendor", "v1"), ("other", "x=y")])
    remote = SpanContext(0xABC, 0xDEF, True, TraceFlags(1), state)
    attributes = {
        "negative": -5, "large": 2**62, "zero": 0, "bytes": b"\x00\x01", "empty": "",
        "float": 0.0, "false": False, "ints": [1, -2], "floats": [1.5], "texts": ["x", ""],
        "none": [],
    }  # fmt: skip
    for kind, code in ((SpanKind.SERVER, StatusCode.OK), (SpanKind.PRODUCER, StatusCode.ERROR)):
        with tracer.start_as_current_span(
            f"remote child {kind.name}",
            context=set_span_in_context(NonRecordingSpan(remote)),
            kind=kind,
            # the same name and equal values of other types in the two spans
            attributes=attributes | {"same": True if kind is SpanKind.SERVER else 1},
            links=[Link(remote, {"why": "b"})],
        ) as span:
            span.add_event("at zero", {"x": 1}, timestamp=0)
            span.add_event("bare")
            span.set_status(Status(code, "failed" if code is StatusCode.ERROR else None))
    return list(kept.get_finished_spans())


def test_a_request_encoded_on_the_wire_is_the_one_the_sdk_encodes():
    spans = every_kind_of_span()
    assert [s.name for s in spans][:3] == ["elsewhere", "llmq.claim", "llmq.job"]
    encoder = RequestEncoder()
    for _ in range(2):  # the second time from the encoder's resource and scope cache
        request = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        assert request == encode_spans(spans)
    assert [len(r.scope_spans) for r in request.resource_spans] == [1, 1]
    forgetful = RequestEncoder()
    forgetful.MAX_KEPT = 1  # every resource and scope encoded anew, even within a batch
    assert ExportTraceServiceRequest.FromString(forgetful.encode(spans)) == request


def test_an_attribute_the_encoders_cannot_encode_is_left_out_of_both():
    kept = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    span = provider.get_tracer("llmq").start_span("s", attributes={"kept": 1})
    span._attributes._dict["too large"] = 2**64  # what the SDK's checks let through
    span.end()
    spans = kept.get_finished_spans()
    request = ExportTraceServiceRequest.FromString(RequestEncoder().encode(spans))
    assert request == encode_spans(spans)
    [attribute] = request.resource_spans[0].scope_spans[0].spans[0].attributes
    assert attribute.key == "kept"


def test_spans_read_back_from_a_request_encode_as_the_request():
    """The child's way with an exporter that takes only spans."""
    spans = every_kind_of_span()
    request = ExportTraceServiceRequest.FromString(RequestEncoder().encode(spans))
    read = spans_in(request)
    assert encode_spans(read) == request
    job = read[2]
    assert job.kind is SpanKind.CONSUMER and read[1].parent.span_id == job.context.span_id
    assert job.attributes == {"llmq.job_id": "j1", "llmq.attempt": 2, "flags": (True, False)}
    assert (job.status.status_code, job.status.description) == (StatusCode.ERROR, "model_error")


def test_an_exporter_without_an_http_client_is_given_the_spans():
    request = RequestEncoder().encode(every_kind_of_span())
    exporter = InMemorySpanExporter()  # export(spans) only, as one without `_client` would be
    _sender(exporter)(request)
    sent = ExportTraceServiceRequest.FromString(request)
    assert encode_spans(exporter.get_finished_spans()) == sent


def test_spans_reach_the_receiver_through_the_child(receiver):
    exporter = ChildProcessExporter()
    provider, linked, job = spans_of(exporter)
    trace_id = f"{job.get_span_context().trace_id:032x}"
    spans = receiver.trace(trace_id, lambda s: "llmq.claim" in s and "llmq.job" in s)
    (sent,) = spans["llmq.job"]
    assert sent["service"] == "llmq-test"
    assert sent["attributes"] == {"llmq.job_id": "j1", "llmq.attempt": 2, "flags": [True, False]}
    assert sent["links"] == [f"{linked.get_span_context().trace_id:032x}"]
    (claim,) = spans["llmq.claim"]
    assert claim["parent"] == sent["span_id"]
    assert (claim["start"], claim["end"]) == (1e-6, 2e-6)
    provider.shutdown()  # closes the child's input: it exits once it has sent what it holds
    assert exporter._child is None


def test_a_lost_child_is_replaced_by_the_next_batch(receiver):
    exporter = ChildProcessExporter()
    spans_of(exporter)
    child = exporter._child
    child.kill()
    child.wait()
    provider, _, job = spans_of(exporter)
    assert exporter._child is not None and exporter._child.pid != child.pid
    trace_id = f"{job.get_span_context().trace_id:032x}"
    receiver.trace(trace_id, lambda s: "llmq.job" in s)
    provider.shutdown()


def test_the_child_ends_when_its_parent_stops_writing(receiver):
    exporter = ChildProcessExporter()
    spans_of(exporter)
    child = exporter._child
    child.stdin.close()  # as when the process that made the spans exits
    deadline = time.monotonic() + 10
    while child.poll() is None:
        assert time.monotonic() < deadline, "the export process outlived its input"
        time.sleep(0.05)
    assert child.returncode == 0
    assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(str(receiver.port))
