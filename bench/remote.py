"""Relaying overhead of a remote model: the same streamed completions asked of an upstream llmq
directly, and through a front llmq whose `source: remote` model sends them to it.

    python -m bench.remote [--clients 64] [--tokens 64] [--requests 256] [--rounds 3]

Two stacks on this machine, each with its own Postgres database and Redis database: the upstream
(API and a worker holding stories260K, the model that ships with llmq), and the front (API and a
remote worker, which loads no model). Rounds alternate direct and through the front; each round
sends `--requests` streamed completions of `--tokens` tokens from `--clients` concurrent clients,
distinct prompts (so never a cache hit; the upstream stores cache entries for both paths alike).
Figures are medians over the rounds: completion tokens per second over the round's wall time, and
the p50 time to the first streamed text. The front's own processes share this machine's cores with
the upstream's model, so its ratio here includes that contention; on separate machines only the
added latency remains.
"""

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from bench.models import STORIES
from bench.run import percentile, stream_completion
from bench.stack import bench_urls, llmq_stack

console = Console(width=150)
UPSTREAM_PORT, FRONT_PORT = 8771, 8772


async def one_round(base: str, model: str, args, round_number: int) -> tuple[float, list[float]]:
    """Tokens per second and each request's time to first text."""
    firsts: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(args.requests):
        queue.put_nowait(number)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            number = queue.get_nowait()
            body = {
                "model": model,
                "prompt": f"Once upon a time, {model} round {round_number} story {number}",
                "max_tokens": args.tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            first, used = await stream_completion(http, base, body)
            tokens += used
            if first is not None:  # a request that brought no text has no first text
                firsts.append(first)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    return tokens / (time.perf_counter() - started), firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmq-bench-remote-") as tmp:
        workdir = Path(tmp)
        model_id = "stories260K"
        source = str(STORIES)
        upstream_model = {
            "id": model_id,
            "source": source,
            "devices": ["cpu"],
            "max_batch_size": 64,
            "context_length": 512,
        }
        front_model = {
            "id": f"{model_id}-remote",
            "source": "remote",
            "tokenizer": source,
            "context_length": 512,
            "remote": {
                "base_url": f"http://127.0.0.1:{UPSTREAM_PORT}/v1",
                "model": model_id,
                "max_concurrency": args.clients,
            },
        }
        upstream_redis = bench_urls()[1].rsplit("/", 1)[0] + "/11"
        front_redis = bench_urls()[1].rsplit("/", 1)[0] + "/12"
        (workdir / "upstream").mkdir()
        (workdir / "front").mkdir()
        console.print(f"model {model_id}; starting the upstream and the front stacks")
        with (
            llmq_stack(
                [upstream_model],
                workdir / "upstream",
                [model_id],
                port=UPSTREAM_PORT,
                redis_url=upstream_redis,
                database="llmq_bench_upstream",
            ) as (upstream, upstream_processes),
            llmq_stack(
                [front_model],
                workdir / "front",
                [front_model["id"]],
                port=FRONT_PORT,
                redis_url=front_redis,
                database="llmq_bench_front",
            ) as (front, front_processes),
        ):
            stacks = {"upstream": upstream_processes, "front": front_processes}
            paths = {
                "upstream, directly": (upstream, model_id),
                "through the front": (front, front_model["id"]),
            }
            for base, model in paths.values():  # warm both
                asyncio.run(
                    one_round(base, model, argparse.Namespace(**{**vars(args), "requests": 8}), -1)
                )
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
            cpu: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for round_number in range(args.rounds):
                for name, (base, model) in paths.items():
                    before = {stack: cpu_seconds(p) for stack, p in stacks.items()}
                    rate, firsts = asyncio.run(one_round(base, model, args, round_number))
                    used = {s: cpu_seconds(p) - before[s] for s, p in stacks.items()}
                    cpu[name].append({s: 1000 * v / args.requests for s, v in used.items()})
                    ttft_ms = percentile(firsts, 50) * 1000
                    figures[name].append((rate, ttft_ms))
                    say = f"round {round_number + 1} {name}: {rate:,.0f} tok/s, TTFT p50"
                    console.print(f"{say} {ttft_ms:.1f} ms")
        report(figures, cpu, args, model_id)


def cpu_seconds(processes: list[subprocess.Popen]) -> float:
    """CPU seconds the stack's API and workers have used so far (their threads included)."""
    total = 0.0
    for process in processes:
        with suppress(psutil.Error):
            times = psutil.Process(process.pid).cpu_times()
            total += times.user + times.system
    return total


def report(figures, cpu, args, model_id: str) -> None:
    medians = {
        name: (statistics.median(r for r, _ in runs), statistics.median(t for _, t in runs))
        for name, runs in figures.items()
    }
    base_rate, base_ttft = medians["upstream, directly"]
    table = Table(
        title=f"Remote relaying: {model_id}, {args.clients} clients × {args.tokens} tokens, "
        f"{args.requests} requests, median of {args.rounds} rounds"
    )
    columns = ["path", "tokens/s", "ratio", "TTFT p50 (ms)", "added TTFT (ms)"]
    columns += ["upstream CPU ms/request", "front CPU ms/request"]
    for column in columns:
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, (rate, ttft) in medians.items():
        spent = {s: statistics.median(r[s] for r in cpu[name]) for s in ("upstream", "front")}
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{rate / base_rate:.2f}×",
            f"{ttft:.1f}",
            f"{ttft - base_ttft:+.1f}",
            f"{spent['upstream']:.1f}",
            f"{spent['front']:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
