"""Interactive latency beside an evaluation run: does background work starve interactive work?

    python -m bench.interactive [--limit 15] [--clients 4] [--repeats 3]

One stack (API, one worker holding stories260K, completion cache off, MMLU from ../shared/data).
Three phases, each repeated: interactive 16-token completions from `--clients` clients with
nothing else to do (idle); an MMLU run alone (its wall time); the same MMLU run while the
interactive clients go on (their latency during it, and the run's wall time beside them).
Figures are medians over the repeats of each phase's p50 and p99.
"""

import argparse
import asyncio
import csv
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.evals import MODEL, SHARED_DATA
from bench.models import STORIES
from bench.run import percentile
from bench.stack import llmq_stack

console = Console(width=140)
INTERACTIVE_TOKENS = 16
_copies = itertools.count()


async def interactive(base: str, clients: int, stop: asyncio.Event, at_least: int) -> list[float]:
    """Latencies of 16-token completions until `stop` is set and each client sent `at_least`."""
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient, number: int) -> None:
        sent = 0
        while not stop.is_set() or sent < at_least:
            body = {
                "model": MODEL,
                "prompt": f"Once upon a time, client {number} asked {sent}",
                "max_tokens": INTERACTIVE_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            }
            started = time.perf_counter()
            response = await http.post(f"{base}/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            sent += 1

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http, n) for n in range(clients)))
    return latencies


def fresh_copy(data_dir: Path) -> str:
    """A copy of MMLU whose questions each end in the copy's number: a run reuses the items an
    earlier run answered for the same prompts, and each run measured here must compute its
    own (the same work: a few more tokens per item)."""
    number = next(_copies)
    name = f"mmlu-{number}"
    shutil.copytree(SHARED_DATA / "mmlu" / "dev", data_dir / name / "dev")
    (data_dir / name / "test").mkdir()
    for source in (SHARED_DATA / "mmlu" / "test").glob("*.csv"):
        with source.open(newline="") as handle:
            rows = list(csv.reader(handle))
        header = rows[:1] if rows and rows[0][0] == "question" else []
        tagged = [[f"{row[0]} ({number})", *row[1:]] for row in rows[len(header) :]]
        with (data_dir / name / "test" / source.name).open("w", newline="") as handle:
            csv.writer(handle).writerows(header + tagged)
    return name


async def mmlu_run(base: str, limit: int, data_dir: Path) -> float:
    """Wall seconds of one MMLU run, submission to its end."""
    dataset = fresh_copy(data_dir)
    body = {"benchmark": "mmlu", "model": MODEL, "limit": limit, "dataset": dataset}
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        started = time.perf_counter()
        run = (await http.post("/v1/evals", json=body)).json()
        while run["status"] not in ("succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.25)
            run = (await http.get(f"/v1/evals/{run['id']}")).json()
        assert run["status"] == "succeeded", run
        return time.perf_counter() - started


async def beside_run(
    base: str, limit: int, clients: int, data_dir: Path
) -> tuple[list[float], float]:
    stop = asyncio.Event()
    traffic = asyncio.create_task(interactive(base, clients, stop, at_least=1))
    wall = await mmlu_run(base, limit, data_dir)
    stop.set()
    return await traffic, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=15, help="MMLU items per subject")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-requests", type=int, default=40, help="per client, idle phase")
    args = parser.parse_args()
    if not (SHARED_DATA / "mmlu").is_dir():
        raise SystemExit(f"needs {SHARED_DATA / 'mmlu'}")
    spec = {"id": MODEL, "source": str(STORIES), "devices": ["cpu"], "max_batch_size": 64}
    spec |= {"context_length": 512, "max_wait_ms": 10}
    idle: list[tuple[float, float, float]] = []  # p50, p99, requests per second
    during: list[tuple[float, float, float]] = []
    alone_s: list[float] = []
    beside_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="llmq-interactive-") as workdir:
        data_dir = Path(workdir) / "evals"
        data_dir.mkdir()
        stack = llmq_stack(
            [spec],
            Path(workdir),
            [MODEL],
            database="llmq_bench_interactive",
            LLMQ_CACHE="off",
            LLMQ_EVAL_DATA_DIR=str(data_dir),
        )
        with stack as (base, _):
            run_phases(base, args, data_dir, idle, during, alone_s, beside_s)
    report(args, idle, during, alone_s, beside_s)


def run_phases(base: str, args, data_dir: Path, idle, during, alone_s, beside_s) -> None:
    asyncio.run(interactive(base, args.clients, _set(), at_least=5))  # warm-ups
    asyncio.run(mmlu_run(base, 1, data_dir))
    for _ in range(args.repeats):
        started = time.perf_counter()
        latencies = asyncio.run(interactive(base, args.clients, _set(), args.idle_requests))
        idle.append(_figures(latencies, time.perf_counter() - started))
        alone_s.append(asyncio.run(mmlu_run(base, args.limit, data_dir)))
        latencies, wall = asyncio.run(beside_run(base, args.limit, args.clients, data_dir))
        during.append(_figures(latencies, wall))
        beside_s.append(wall)


def _figures(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    return percentile(latencies, 50), percentile(latencies, 99), len(latencies) / seconds


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


def report(args, idle, during, alone_s, beside_s) -> None:
    p50_idle, p99_idle, rate_idle = (statistics.median(p[i] for p in idle) for i in (0, 1, 2))
    p50_during, p99_during, rate_during = (
        statistics.median(p[i] for p in during) for i in (0, 1, 2)
    )
    table = Table(
        title=f"{INTERACTIVE_TOKENS}-token completions from {args.clients} clients beside an MMLU "
        f"run (limit {args.limit} per subject), medians of {args.repeats}"
    )
    for column in ("", "p50 ms", "p99 ms", "÷ idle (p50)", "requests/s"):
        table.add_column(column, justify="right")
    table.add_row(
        "idle", f"{p50_idle * 1000:.0f}", f"{p99_idle * 1000:.0f}", "1.00×", f"{rate_idle:.1f}"
    )
    table.add_row(
        "during the MMLU run",
        f"{p50_during * 1000:.0f}",
        f"{p99_during * 1000:.0f}",
        f"{p50_during / p50_idle:.2f}×",
        f"{rate_during:.1f}",
    )
    console.print(table)
    alone, beside = statistics.median(alone_s), statistics.median(beside_s)
    runs = Table(title="The MMLU run's wall time")
    for column in ("", "seconds", "÷ alone"):
        runs.add_column(column, justify="right")
    runs.add_row("alone", f"{alone:.1f}", "1.00×")
    runs.add_row("beside interactive traffic", f"{beside:.1f}", f"{beside / alone:.2f}×")
    console.print(runs)


if __name__ == "__main__":
    main()
