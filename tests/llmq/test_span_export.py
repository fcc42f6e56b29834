"""Span export through a child process (llmq/span_export.py): what reaches an OTLP receiver is
what the SDK recorded, and a child that dies costs one batch, not tracing."""

import os
import time

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from llmq.span_export import ChildProcessExporter, _flat, rebuild
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


class _Keep:
    """An exporter that keeps what it is given (for comparing with what is rebuilt)."""

    def __init__(self) -> None:
        self.spans = []

    def export(self, spans):
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_a_span_flattened_and_rebuilt_encodes_as_the_span_itself():
    kept = _Keep()
    spans_of(kept)
    assert [s.name for s in kept.spans] == ["elsewhere", "llmq.claim", "llmq.job"]
    resource = kept.spans[0].resource
    scopes = {}
    rebuilt = [rebuild(_flat(span), resource, scopes) for span in kept.spans]
    # What the child sends for them is what the SDK's exporter would send for the originals.
    assert encode_spans(rebuilt) == encode_spans(kept.spans)
    elsewhere, claim, job = rebuilt
    assert job.context.span_id == kept.spans[2].context.span_id and claim.parent == job.context
    assert job.kind is SpanKind.CONSUMER
    assert dict(job.attributes) == {"llmq.job_id": "j1", "llmq.attempt": 2, "flags": (True, False)}
    events = [(e.name, dict(e.attributes)) for e in job.events]
    assert events == [("first token", {"token_index": 0})]
    assert [(link.context.span_id, dict(link.attributes)) for link in job.links] == [
        (elsewhere.context.span_id, {"why": "collection"})
    ]
    assert (job.status.status_code, job.status.description) == (StatusCode.ERROR, "model_error")
    assert (job.instrumentation_scope.name, job.instrumentation_scope.version) == ("llmq", "1.0")
    assert (claim.start_time, claim.end_time) == (1_000, 2_000)


def test_spans_reach_the_receiver_through_the_child(receiver):
    exporter = ChildProcessExporter(Resource({"service.name": "llmq-test"}))
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
    exporter = ChildProcessExporter(Resource({"service.name": "llmq-test"}))
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
    exporter = ChildProcessExporter(Resource({"service.name": "llmq-test"}))
    spans_of(exporter)
    child = exporter._child
    child.stdin.close()  # as when the process that made the spans exits
    deadline = time.monotonic() + 10
    while child.poll() is None:
        assert time.monotonic() < deadline, "the export process outlived its input"
        time.sleep(0.05)
    assert child.returncode == 0
    assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(str(receiver.port))
