"""Two llmq stacks that differ only in their environment, one-token jobs through each, their
rounds alternated so that the machine's drift falls on both alike.

    python -m bench.side_by_side LLMQ_SEND_LINGER_MS=0 [VAR=VALUE ...]
        [--path /v1/completions] [--rounds 9] [--jobs 400] [--clients 64]

Both stacks are bench.jobpath's (distinct prompts, the cache off, stories260K), each with its
own Postgres database and Redis database: "as set" runs with the environment this command has,
"changed" with the given variables on top of it. The table shows each stack's median jobs/s
and p50 latency over the rounds, the changed stack's jobs/s as a share of the other's (of the
medians, and the median of each round's share), and CPU ms per job of the API, the worker's
Celery process, its engine process and this process (the load clients). bench.tracing measures
tracing this way.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import psutil
from rich.console import Console
from rich.table import Table

from bench.jobpath import Seconds, http_clients, own_seconds, post_one, tree_seconds
from bench.models import benchmark_models
from bench.run import percentile
from bench.servers import free_port
from bench.stack import bench_urls, llmq_stack
from llmq.tiny_model import ensure_tiny_model

console = Console(width=140)
# Each side's Postgres database and Redis database (bench.jobpath uses 12, the tests 15).
DATABASES = (("llmq_bench_side_a", 6), ("llmq_bench_side_b", 7))
PROCESSES = ("API", "worker", "engine", "clients")  # the order of the CPU columns


class Round(NamedTuple):
    jobs_per_s: float
    p50_s: float
    cpu_ms: dict[str, float]  # per job, by process


class Extras(NamedTuple):
    """What a caller adds to each side: CPU probes of its API and worker processes' children,
    by name, and a hook run after each of its rounds (side, jobs)."""

    probes: Callable[[str, list[psutil.Process]], dict[str, Seconds]] = lambda side, procs: {}
    after_round: Callable[[str, int], None] = lambda side, jobs: None


NO_EXTRAS = Extras()


def alternate(
    sides: dict[str, dict[str, str]], args, extras: Extras = NO_EXTRAS
) -> dict[str, list[Round]]:
    """Start a stack for each of the two sides (their extra environment), warm each with one
    job per client, then measure `args.rounds` rounds of `args.jobs` jobs on each, the two
    sides' order swapped every round. CPU by process: the API (its children included), the
    worker's Celery process, its children (the engine), this process, and `extras.probes`."""
    workdir = Path(tempfile.mkdtemp(prefix="llmq-side-by-side-"))
    model, model_dir = next(benchmark_models("stories260K", workdir, console.print), (None, None))
    if model_dir is None:
        model, model_dir = "tiny-llama", ensure_tiny_model(workdir / "tiny-llama")
    spec = {"id": model, "source": str(model_dir), "devices": ["cpu"], "context_length": 512}
    spec["max_batch_size"] = args.clients
    rounds: dict[str, list[Round]] = {side: [] for side in sides}
    wait = "submit" if args.path == "/v1/jobs" else None
    with ExitStack() as stack:
        probes, prepares = {}, {}
        for (side, env), (database, redis_db) in zip(sides.items(), DATABASES, strict=True):
            (workdir / side).mkdir()
            base, processes = stack.enter_context(
                llmq_stack(
                    [spec],
                    workdir / side,
                    [model],
                    port=free_port(),
                    redis_url=f"{bench_urls(database)[1].rsplit('/', 1)[0]}/{redis_db}",
                    database=database,
                    LLMQ_CACHE="off",
                    **env,
                )
            )
            api, worker = (psutil.Process(p.pid) for p in processes)
            probes[side] = {
                "API": tree_seconds(api),
                "worker": _own(worker),
                "worker tree": tree_seconds(worker),
                "clients": _own(psutil.Process()),
                **extras.probes(side, [api, worker]),
            }
            prepares[side] = http_clients(base, args.clients, post_one(args.path, model, wait))
            prepares[side](range(args.clients))()  # warm-up: one job per client
        number = args.clients
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for side in order:
                run = prepares[side](range(number, number + args.jobs))
                number += args.jobs
                before = {name: sum(seconds().values()) for name, seconds in probes[side].items()}
                began = time.perf_counter()
                latencies = run()
                wall_s = time.perf_counter() - began
                after = {name: sum(seconds().values()) for name, seconds in probes[side].items()}
                cpu = {name: 1000 * (after[name] - before[name]) / args.jobs for name in after}
                cpu["engine"] = cpu.pop("worker tree") - cpu["worker"]
                rounds[side].append(Round(args.jobs / wall_s, percentile(latencies, 50), cpu))
                extras.after_round(side, args.jobs)
                console.print(
                    f"round {round_ + 1}/{args.rounds} {side}: {args.jobs / wall_s:,.1f} jobs/s"
                )
    console.print(f"logs in {workdir}")
    return rounds


def _own(process: psutil.Process) -> Seconds:
    return lambda: {process.pid: own_seconds(process)}


def table(title: str, rounds: dict[str, list[Round]], extra_columns: dict[str, list[str]]):
    """The two sides' rows: the second side's jobs/s over the first's (of the medians, and the
    median of each round's share: the machine's speed drifts between rounds more than within
    one), then `extra_columns` (a value per side), then CPU ms per job by process."""
    first, second = rounds
    measured = list(dict.fromkeys(name for r in rounds[first] for name in r.cpu_ms))
    processes = sorted(measured, key=lambda p: PROCESSES.index(p) if p in PROCESSES else 99)
    out = Table(title=title)
    columns = ("", "jobs/s (median)", "jobs/s (rounds)", "p50 ms", f"÷ {first}", "by round")
    for column in (*columns, *extra_columns, *(f"{p} CPU ms/job" for p in processes)):
        out.add_column(column, justify="right")
    base = statistics.median(r.jobs_per_s for r in rounds[first])
    by_round = statistics.median(
        b.jobs_per_s / a.jobs_per_s for a, b in zip(rounds[first], rounds[second], strict=True)
    )
    for index, (side, runs) in enumerate(rounds.items()):
        rate = statistics.median(r.jobs_per_s for r in runs)
        out.add_row(
            side,
            f"{rate:,.1f}",
            " ".join(f"{r.jobs_per_s:,.0f}" for r in runs),
            f"{1000 * statistics.median(r.p50_s for r in runs):,.1f}",
            f"{rate / base:.3f}",
            f"{by_round:.3f}" if index else "1",
            *(values[index] for values in extra_columns.values()),
            *(f"{statistics.median(r.cpu_ms.get(p, 0.0) for r in runs):.2f}" for p in processes),
        )
    return out


def add_arguments(parser: argparse.ArgumentParser, rounds: int, jobs: int, clients: int) -> None:
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds of each")
    parser.add_argument("--jobs", type=int, default=jobs, help="jobs in each round")
    parser.add_argument("--clients", type=int, default=clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("changes", nargs="+", metavar="VAR=VALUE", help="the changed stack's")
    parser.add_argument(
        "--path",
        default="/v1/jobs",
        choices=("/v1/jobs", "/v1/completions"),
        help="POST /v1/jobs?wait=60 or /v1/completions",
    )
    add_arguments(parser, rounds=9, jobs=400, clients=64)
    args = parser.parse_args()
    changes = dict(change.split("=", 1) for change in args.changes if "=" in change)
    if len(changes) != len(args.changes):
        parser.error("each change is VAR=VALUE")
    rounds = alternate({"as set": {}, "changed": changes}, args)
    title = (
        f"{args.rounds} rounds of {args.jobs} one-token jobs, POST {args.path}, {args.clients} "
        f"clients; changed: {' '.join(args.changes)}"
    )
    console.print(table(title, rounds, {}))


if __name__ == "__main__":
    main()
