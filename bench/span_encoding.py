"""What encoding a batch of spans for OTLP costs: the SDK's encoder against llmq's wire encoder
(llmq/otlp_wire.py), on spans like those a traced one-token job makes.

    python -m bench.span_encoding [--batches 30]

Two batches of 512 spans: the API's (a request's server span with its attributes, the
`INSERT`'s span with its statement, Celery's publish span, `llmq.submit`) and the worker's
(the eight spans llmq makes for a job, as `tracing.finished_span` makes them), each batch with
its own job ids, message ids and client ports. The encoders take turns on each of `--batches`
batches of each; the table shows the median µs per span and the ratio.
"""

import argparse
import itertools
import statistics
import time
import uuid

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from rich.console import Console
from rich.table import Table

from llmq.otlp_wire import RequestEncoder

console = Console()
_ports = itertools.cycle(range(1024, 65536))
BATCH = 512  # the SDK batch processor's default batch size
INSERT = (
    "INSERT INTO jobs (id, kind, model, queue, status, input, params, owner, request_id, "
    "idempotency_key, trace_context, timeout_s, use_cache) VALUES (%(id)s::UUID, %(kind)s, "
    "%(model)s, %(queue)s, %(status)s, %(input)s::JSONB, %(params)s::JSONB, %(owner)s, "
    "%(request_id)s, %(idempotency_key)s, %(trace_context)s, %(timeout_s)s, %(use_cache)s) "
    "RETURNING jobs.created_at, jobs.attempts"
)


def api_spans() -> list[ReadableSpan]:
    kept = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "llmq-api"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    fastapi, llmq = provider.get_tracer("fastapi", "0.165"), provider.get_tracer("llmq")
    sqlalchemy = provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", "0.66b2")
    celery = provider.get_tracer("opentelemetry.instrumentation.celery", "0.66b2")
    while len(kept.get_finished_spans()) < BATCH:
        server = {
            "url.scheme": "http", "http.request.method": "POST",
            "network.protocol.version": "1.1", "server.address": "127.0.0.1",
            "server.port": 8000, "client.address": "127.0.0.1",
            "client.port": next(_ports), "url.path": "/v1/jobs", "url.query": "wait=60",
            "http.route": "/v1/jobs", "http.response.status_code": 202,
        }  # fmt: skip
        with fastapi.start_as_current_span("POST /v1/jobs", kind=SpanKind.SERVER) as span:
            span.set_attributes(server)
            with llmq.start_as_current_span("llmq.submit", attributes={"llmq.jobs": 1}):
                statement = {
                    "db.statement": INSERT, "db.system": "postgresql", "db.name": "llmq",
                    "net.peer.name": "127.0.0.1", "net.peer.port": 5432,
                }  # fmt: skip
                with sqlalchemy.start_as_current_span(
                    "INSERT llmq", kind=SpanKind.CLIENT, attributes=statement
                ):
                    pass
                publish = {
                    "celery.action": "apply_async", "celery.task_name": "llmq.generate",
                    "messaging.message.id": str(uuid.uuid4()),
                    "messaging.destination": "llmq.stories260K.cpu",
                }  # fmt: skip
                with celery.start_as_current_span(
                    "apply_async/llmq.generate", kind=SpanKind.PRODUCER, attributes=publish
                ):
                    pass
    return list(kept.get_finished_spans()[:BATCH])


def worker_spans() -> list[ReadableSpan]:
    resource = Resource({"service.name": "llmq-worker"})
    scope = InstrumentationScope("llmq")
    spans = []
    names = (
        "llmq.queue_wait", "llmq.claim", "llmq.engine.admission", "llmq.engine.prefill",
        "llmq.engine.decode", "llmq.result.write", "llmq.stream.publish", "llmq.job",
    )  # fmt: skip
    while len(spans) < BATCH:
        job_id, trace_id = str(uuid.uuid4()), uuid.uuid4().int
        parent = SpanContext(trace_id, 1, False, TraceFlags(1))
        for number, name in enumerate(names, start=2):
            attributes = {"llmq.job_id": job_id, "llmq.attempt": 1}
            if name == "llmq.engine.decode":
                attributes |= {"llmq.decode.steps": 1, "llmq.decode.mean_batch_size": 31.5}
            if name == "llmq.job":
                attributes |= {"llmq.model": "stories260K", "llmq.queue": "llmq.stories260K.cpu"}
            context = SpanContext(trace_id, number, False, TraceFlags(1))
            spans.append(
                ReadableSpan(
                    name,
                    context,
                    parent,
                    resource,
                    attributes,
                    start_time=1,
                    end_time=2,
                    instrumentation_scope=scope,
                )  # fmt: skip
            )
    return spans[:BATCH]


def medians_us_per_span(encoders, batches: list[list[ReadableSpan]]) -> list[float]:
    """Each encoder's median µs per span, the encoders taking turns on each batch (their order
    alternating), so that the machine's drifting speed falls on all of them alike."""
    times: list[list[float]] = [[] for _ in encoders]
    for number, spans in enumerate(batches):
        turns = list(enumerate(encoders))
        for index, encode in turns if number % 2 == 0 else reversed(turns):
            started = time.perf_counter()
            encode(spans)
            times[index].append((time.perf_counter() - started) / len(spans))
    return [1e6 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    table = Table(title=f"OTLP encoding, µs per span: median of {args.batches} batches of {BATCH}")
    for column in ("spans", "SDK encoder", "wire encoder", "÷ SDK"):
        table.add_column(column, justify="right")
    for name, make in (("API", api_spans), ("worker", worker_spans)):
        batches = [make() for _ in range(args.batches)]
        sdk, wire = medians_us_per_span(
            (lambda s: encode_spans(s).SerializeToString(), RequestEncoder().encode), batches
        )
        table.add_row(name, f"{sdk:.1f}", f"{wire:.1f}", f"{wire / sdk:.2f}×")
    console.print(table)


if __name__ == "__main__":
    main()
