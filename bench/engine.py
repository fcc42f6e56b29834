"""The batching engine alone, in process: continuous against static micro-batching on workload
(b) of bench.run (output lengths mixed from 8 to 256 tokens), with no API, queue or database.

    python -m bench.engine [--models llama-25m,stories260K] [--requests-per-client 3]
                           [--groups 1,4] [--repeats 3]

`--groups` lists the running batch's cache-group limits to run continuous batching with (1: one
padded cache for the whole batch). Prints tokens/s, decode steps, rows per step and the short
jobs' p50 latency, with each system's ratio against static, medians over the repeats.
"""

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.run import SHORT_JOB_TOKENS, make_workload, median_result
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from workers.threads import apply_thread_defaults

console = Console(width=140)


@dataclass(frozen=True)
class EngineRun:
    tokens_per_s: float
    steps: int
    rows_per_step: float
    short_p50_s: float


def run_clients(engine, jobs: list[tuple[list[int], int]], clients: int) -> EngineRun:
    """`clients` threads, each submitting its next job when its last one ends."""
    from workers.engine import GenerationRequest

    pending = list(jobs)
    lock = threading.Lock()
    tokens: list[int] = []
    short_latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt, max_tokens = pending.pop()
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            started = time.perf_counter()
            output = engine.submit(GenerationRequest(uuid.uuid4(), prompt, params)).result()
            with lock:
                tokens.append(output.completion_tokens)
                if max_tokens <= SHORT_JOB_TOKENS:
                    short_latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    steps_before, started = engine.steps, time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    steps = engine.steps - steps_before
    return EngineRun(
        sum(tokens) / wall, steps, sum(tokens) / steps, statistics.median(short_latencies)
    )


def bench_model(name: str, model_dir: Path, args) -> None:
    from workers.engine import GenerationEngine
    from workers.host import ModelHost

    spec = ModelSpec(id=name, source=str(model_dir), context_length=512)
    host = ModelHost.load(spec, "cpu", model_dir.parent)
    requests = make_workload("b", args.clients * args.requests_per_client, seed=1)
    jobs = [(host.encode(r.prompt), r.max_tokens) for r in requests]
    systems = {"static": {"continuous": False}} | {
        f"continuous, {g} cache group{'s' if g > 1 else ''}": {"max_cache_groups": g}
        for g in args.groups
    }
    results: dict[str, EngineRun] = {}
    for system, options in systems.items():
        engine = GenerationEngine(
            host,
            max_batch_size=args.clients,
            max_batch_tokens=1_000_000,
            max_wait_ms=10,
            **options,
        )
        engine.start()
        try:
            run_clients(engine, jobs[: args.clients], args.clients)  # warm-up
            runs = [run_clients(engine, jobs, args.clients) for _ in range(args.repeats)]
        finally:
            engine.stop()
        results[system] = median_result(runs)

    table = Table(
        title=f"{name}: engine alone, {len(jobs)} requests of 8–256 tokens, "
        f"{args.clients} clients, median of {args.repeats}"
    )
    for column in ["system", "tok/s", "decode steps", "rows/step", "short p50 s", "÷ static"]:
        table.add_column(column, justify="right")
    static = results["static"].tokens_per_s
    for system, run in results.items():
        table.add_row(
            system,
            f"{run.tokens_per_s:,.0f}",
            str(run.steps),
            f"{run.rows_per_step:.1f}",
            f"{run.short_p50_s:.2f}",
            f"{run.tokens_per_s / static:.2f}×",
        )
    console.print(table)


def main() -> None:
    apply_thread_defaults()  # as in a worker, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-25m,stories260K")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--groups", default="1,4", help="cache-group limits for continuous")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.groups = [int(g) for g in args.groups.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-engine-"))
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        bench_model(name, model_dir, args)


if __name__ == "__main__":
    main()
