"""What tracing costs the job path: one-token jobs/s with tracing off against tracing on at 100%
sampling, two stacks side by side, their rounds alternated so that noise falls on both alike.

    python -m bench.tracing [--rounds 5] [--jobs 500] [--clients 32]

Both stacks are bench.jobpath's `jobs` system (POST /v1/jobs?wait=60, distinct prompts, the
cache off), each with its own Postgres database and Redis database. The traced one exports
OTLP/HTTP to a receiver in this process that parses and counts the spans (its CPU is this
process's, as a collector's would be another's); the other has no OTEL_* variables at all, as
a stack does by default (--sampler sets the traced one's OTEL_TRACES_SAMPLER: always_off
measures the instrumentation alone). The table shows each stack's median jobs/s and p50
latency over the rounds, the traced stack's jobs/s as a share of the untraced one's (of the
medians, and the median of each round's share: the machine's speed drifts), and CPU ms
per job of the API, the worker's Celery process, its engine process, the span export processes
of both (llmq/span_export.py) and this process (load clients and receiver). The two stacks are
bench.side_by_side's.
"""

import argparse
import statistics
import threading
import time
from contextlib import suppress

import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.jobpath import Seconds, own_seconds
from bench.otlp import OtlpReceiver
from bench.side_by_side import Extras, add_arguments, alternate, console, table


class SpanSink:
    """Counts the spans it is sent, as a collector would receive them."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self.port = OtlpReceiver(self._count).port

    def _count(self, request: ExportTraceServiceRequest) -> None:
        count = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        with self._lock:
            self.spans += count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, rounds=5, jobs=500, clients=32)
    parser.add_argument(
        "--sampler",
        default="parentbased_always_on",
        help="the traced stack's OTEL_TRACES_SAMPLER (always_off: the instrumentation alone)",
    )
    parser.add_argument(
        "--sampler-arg", default="", help="its OTEL_TRACES_SAMPLER_ARG (a ratio: 0.1)"
    )
    args = parser.parse_args()
    args.path = "/v1/jobs"
    sink = SpanSink()
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_TRACES_SAMPLER": args.sampler,
        # Export every half second rather than every 5 s, so that a round's spans have arrived
        # when they are counted (at a low ratio the batch queue fills slowly).
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        **({"OTEL_TRACES_SAMPLER_ARG": args.sampler_arg} if args.sampler_arg else {}),
    }
    spans_per_job: list[float] = []
    counted = [0]

    def after_round(side: str, jobs: int) -> None:
        if side == "on":
            time.sleep(1.0)  # the batch processor's schedule: its spans arrive
            spans_per_job.append((sink.spans - counted[0]) / jobs)
        counted[0] = sink.spans

    def probes(side: str, processes: list[psutil.Process]) -> dict[str, Seconds]:
        api, worker = processes
        return {"API export": _span_export(api), "worker export": _span_export(worker)}

    rounds = alternate({"off": {}, "on": traced}, args, Extras(probes, after_round))
    for side in rounds.values():
        for cpu in (r.cpu_ms for r in side):
            # The export processes are children of the API and of the worker: shown apart.
            api_export, worker_export = cpu.pop("API export"), cpu.pop("worker export")
            cpu["API"] -= api_export
            cpu["engine"] -= worker_export
            cpu["span export"] = api_export + worker_export
    sampler = f"{args.sampler} {args.sampler_arg}".strip()
    title = f"tracing cost: {args.rounds} rounds of {args.jobs} one-token jobs; on: {sampler}"
    spans = f"{statistics.median(spans_per_job):.1f}"
    console.print(table(title, rounds, {"spans/job": ["0", spans]}))


def _span_export(root: psutil.Process) -> Seconds:
    """The CPU seconds of the span export process a stack's process runs
    (llmq/span_export.py), while it lives."""

    def seconds() -> dict[int, float]:
        found = {}
        for process in root.children():
            with suppress(psutil.Error):
                if "llmq.span_export" in process.cmdline():
                    found[process.pid] = own_seconds(process)
        return found

    return seconds


if __name__ == "__main__":
    main()
