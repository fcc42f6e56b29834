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
of both (llmq/span_export.py) and this process (load clients and receiver).
"""

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from rich.console import Console
from rich.table import Table

from bench.jobpath import http_clients, own_seconds, post_one, tree_seconds
from bench.models import benchmark_models
from bench.otlp import OtlpReceiver
from bench.run import percentile
from bench.servers import free_port
from bench.stack import bench_urls, llmq_stack
from llmq.tiny_model import ensure_tiny_model

console = Console(width=140)
STACKS = {"off": ("llmq_bench_tracing_off", 6), "on": ("llmq_bench_tracing_on", 7)}


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
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds of each stack")
    parser.add_argument("--jobs", type=int, default=500, help="jobs in each round")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--sampler",
        default="parentbased_always_on",
        help="the traced stack's OTEL_TRACES_SAMPLER (always_off: the instrumentation alone)",
    )
    parser.add_argument(
        "--sampler-arg", default="", help="its OTEL_TRACES_SAMPLER_ARG (a ratio: 0.1)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-tracing-"))
    model, model_dir = next(benchmark_models("stories260K", workdir, console.print), (None, None))
    if model_dir is None:
        model, model_dir = "tiny-llama", ensure_tiny_model(workdir / "tiny-llama")
    spec = {"id": model, "source": str(model_dir), "devices": ["cpu"], "context_length": 512}
    spec["max_batch_size"] = args.clients
    sink = SpanSink()
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_TRACES_SAMPLER": args.sampler,
        # Export every half second rather than every 5 s, so that a round's spans have arrived
        # when they are counted (at a low ratio the batch queue fills slowly).
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        **({"OTEL_TRACES_SAMPLER_ARG": args.sampler_arg} if args.sampler_arg else {}),
    }
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    cpu: dict[str, list[tuple[float, ...]]] = {"off": [], "on": []}  # ms/job by process
    for name in STACKS:
        (workdir / name).mkdir()
    spans_per_job: list[float] = []
    extra = {"off": {}, "on": traced}
    with ExitStack() as stacks:
        started = {
            name: stacks.enter_context(
                llmq_stack(
                    [spec],
                    workdir / name,
                    [model],
                    port=free_port(),
                    redis_url=_redis_url(name),
                    database=STACKS[name][0],
                    LLMQ_CACHE="off",
                    **extra[name],
                )
            )
            for name in STACKS
        }
        bases = {name: base for name, (base, _) in started.items()}
        # CPU seconds of each stack's API (its children included), its span export process,
        # the worker's Celery process, its children (the engine and span export processes), its
        # span export process, and this process (the load clients and the receiver).
        processes = {
            name: [
                tree_seconds(psutil.Process(procs[0].pid)),
                _span_export(psutil.Process(procs[0].pid)),
                _own(psutil.Process(procs[1].pid)),
                tree_seconds(psutil.Process(procs[1].pid)),
                _span_export(psutil.Process(procs[1].pid)),
                _own(psutil.Process()),
            ]
            for name, (_, procs) in started.items()
        }
        prepares = {
            name: http_clients(base, args.clients, post_one("/v1/jobs", model, "submit"))
            for name, base in bases.items()
        }
        for name in ("off", "on"):  # warm-up: one job per client
            prepares[name](range(args.clients))()
        number = args.clients
        for round_ in range(args.rounds):
            order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
            for name in order:
                spans_before = sink.spans
                run = prepares[name](range(number, number + args.jobs))
                number += args.jobs
                before = [sum(seconds().values()) for seconds in processes[name]]
                began = time.perf_counter()
                latencies = run()
                wall_s = time.perf_counter() - began
                after = [sum(seconds().values()) for seconds in processes[name]]
                api_tree, api_export, worker, worker_tree, worker_export, bench = (
                    1000 * (a - b) / args.jobs for a, b in zip(after, before, strict=True)
                )
                engine = worker_tree - worker - worker_export
                export = api_export + worker_export
                cpu[name].append((api_tree - api_export, worker, engine, export, bench))
                results[name].append((args.jobs / wall_s, percentile(latencies, 50)))
                if name == "on":
                    time.sleep(1.0)  # the batch processor's schedule: its spans arrive
                    spans_per_job.append((sink.spans - spans_before) / args.jobs)
                console.print(
                    f"round {round_ + 1}/{args.rounds} tracing {name}: "
                    f"{args.jobs / wall_s:,.1f} jobs/s"
                )
    report(results, cpu, spans_per_job, args)
    console.print(f"logs in {workdir}")


def _own(process: psutil.Process):
    return lambda: {process.pid: own_seconds(process)}


def _span_export(root: psutil.Process):
    """The CPU seconds of the span export process a stack's process runs (llmq/span_export.py),
    while it lives."""

    def seconds() -> dict[int, float]:
        found = {}
        for process in root.children():
            with suppress(psutil.Error):
                if "llmq.span_export" in process.cmdline():
                    found[process.pid] = own_seconds(process)
        return found

    return seconds


def _redis_url(name: str) -> str:
    return f"{bench_urls(STACKS[name][0])[1].rsplit('/', 1)[0]}/{STACKS[name][1]}"


def report(results: dict[str, list[tuple[float, float]]], cpu, spans_per_job, args) -> None:
    sampler = f"{args.sampler} {args.sampler_arg}".strip()
    title = f"tracing cost: {args.rounds} rounds of {args.jobs} one-token jobs; on: {sampler}"
    table = Table(title=title)
    columns = ("jobs/s (median)", "jobs/s (rounds)", "p50 ms", "÷ off", "÷ off by round")
    columns += ("spans/job",)
    processes = ("API", "worker", "engine", "span export", "clients + receiver")
    for column in ("tracing", *columns, *(f"{p} CPU ms/job" for p in processes)):
        table.add_column(column, justify="right")
    off = statistics.median(rate for rate, _ in results["off"])
    # Each round's traced rate over its untraced one, the two measured one after the other: the
    # machine's speed drifts between rounds more than within one.
    by_round = statistics.median(
        on / untraced for (on, _), (untraced, _) in zip(results["on"], results["off"], strict=True)
    )
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        p50 = statistics.median(p for _, p in runs)
        spans = f"{statistics.median(spans_per_job):.1f}" if name == "on" else "0"
        table.add_row(
            "on" if name == "on" else "off",
            f"{rate:,.1f}",
            " ".join(f"{r:,.0f}" for r, _ in runs),
            f"{p50 * 1000:,.1f}",
            f"{rate / off:.3f}",
            f"{by_round:.3f}" if name == "on" else "1",
            spans,
            *(f"{statistics.median(run[i] for run in cpu[name]):.2f}" for i in range(5)),
        )
    console.print(table)


if __name__ == "__main__":
    main()
