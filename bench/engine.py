"""The batching engine alone, in process: continuous against static micro-batching on workload
(b) of bench.run (output lengths mixed from 8 to 256 tokens), with no API, queue or database.

    python -m bench.engine [--models llama-25m,stories260K] [--requests-per-client 3]
                           [--groups 1,4] [--repeats 3]

`--groups` lists the running batch's cache-group limits to run continuous batching with (1: one
padded cache for the whole batch). Prints tokens/s, decode steps, rows per step and the short
jobs' p50 latency, with each system's ratio against static, medians over the repeats; then where
each system's time went (decode passes, prefill passes, the rest) and what a decode pass cost by
its rows, timed through hooks on the model.
"""

import argparse
import collections
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.run import SHORT_JOB_TOKENS, make_workload, median_result
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from workers.threads import apply_thread_defaults

console = Console(width=140)


ROWS_BUCKET = 8  # decode passes are grouped by rows 1–8, 9–16, …


@dataclass(frozen=True)
class EngineRun:
    tokens_per_s: float
    steps: int
    rows_per_step: float
    short_p50_s: float
    wall_s: float = 0.0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    decode_ms_by_rows: dict[int, tuple[float, int]] = field(default_factory=dict)


class PassTimes:
    """The model's forward passes, timed through module hooks: rows, tokens per row, seconds."""

    def __init__(self, model) -> None:
        self.passes: list[tuple[int, int, float]] = []
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module, args, kwargs) -> None:
        self._shape, self._started = kwargs["input_ids"].shape, time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        self.passes.append((*self._shape, time.perf_counter() - self._started))

    def summary(self, run: "EngineRun") -> EngineRun:
        """`run` with the passes recorded since the last summary."""
        passes, self.passes = self.passes, []
        by_rows = collections.defaultdict(list)
        for rows, tokens, seconds in passes:
            if tokens == 1:  # a decode pass; a prefill has BOS and the prompt at least
                by_rows[(rows - 1) // ROWS_BUCKET].append(seconds)
        return replace(
            run,
            decode_s=sum(s for _, tokens, s in passes if tokens == 1),
            prefill_s=sum(s for _, tokens, s in passes if tokens > 1),
            decode_ms_by_rows={
                bucket: (statistics.median(seconds) * 1000, len(seconds))
                for bucket, seconds in sorted(by_rows.items())
            },
        )


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
        sum(tokens) / wall, steps, sum(tokens) / steps, statistics.median(short_latencies), wall
    )


def bench_model(name: str, model_dir: Path, args) -> None:
    from workers.engine import GenerationEngine
    from workers.host import ModelHost

    spec = ModelSpec(id=name, source=str(model_dir), context_length=512)
    host = ModelHost.load(spec, "cpu", model_dir.parent)
    requests = make_workload("b", args.clients * args.requests_per_client, seed=1)
    jobs = [(host.encode(r.prompt), r.max_tokens) for r in requests]
    pass_times = PassTimes(host.model)
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
            pass_times.passes.clear()  # not the warm-up's
            runs = [
                pass_times.summary(run_clients(engine, jobs, args.clients))
                for _ in range(args.repeats)
            ]
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
    console.print(time_table(name, results))


def time_table(name: str, results: dict[str, EngineRun]) -> Table:
    """Where each system's median run spent its time, and a decode pass's cost by its rows."""
    buckets = sorted({b for run in results.values() for b in run.decode_ms_by_rows})
    table = Table(title=f"{name}: where the time went (s), and ms per decode pass by rows (passes)")
    for column in ["system", "wall", "decode", "prefill", "rest"]:
        table.add_column(column, justify="right")
    for bucket in buckets:
        first = bucket * ROWS_BUCKET + 1
        table.add_column(f"{first}–{first + ROWS_BUCKET - 1}", justify="right")
    for system, run in results.items():
        by_rows = run.decode_ms_by_rows
        table.add_row(
            system,
            f"{run.wall_s:.1f}",
            f"{run.decode_s:.1f}",
            f"{run.prefill_s:.1f}",
            f"{run.wall_s - run.decode_s - run.prefill_s:.1f}",
            *[f"{by_rows[b][0]:.0f} ({by_rows[b][1]})" if b in by_rows else "–" for b in buckets],
        )
    return table


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
