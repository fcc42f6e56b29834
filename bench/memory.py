"""Worker memory over a long run: many short jobs through the API while the worker's resident
memory is sampled. Target: it stays within the model's size + 500 MB, and does not creep.

    python -m bench.memory [--models stories260K,llama-25m] [--jobs 10000] [--clients 64]

For each model it prints the peak against the model's size, and the resident memory at each
tenth of the run, so that a plateau shows apart from a creep. First it prints what the worker's
runtime holds before any model: each part imported in a fresh process.
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.run import Request, llmq_request, make_workload, run_clients
from bench.stack import llmq_stack

console = Console(width=160)
MB = 1024 * 1024


# What a worker imports, part by part: each process imports its part and those before it.
RUNTIME_PARTS = [
    ("torch", "import torch"),
    (
        "Transformers with its Llama code",
        "from transformers import AutoTokenizer, LlamaForCausalLM",
    ),
    (
        "the worker's own modules (Celery, SQLAlchemy, psycopg, redis-py, …)",
        "import workers.app, workers.runtime",
    ),
]


def runtime_floor() -> Table:
    """Resident memory after importing each part of a worker's runtime, in fresh processes."""
    table = Table(title="the worker's runtime before any model, imported part by part")
    for column in ["part", "adds", "resident after it"]:
        table.add_column(column, justify="right")
    imports, before = [], 0
    for part, statement in RUNTIME_PARTS:
        imports.append(statement)
        code = "\n".join([*imports, "import psutil", "print(psutil.Process().memory_info().rss)"])
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        rss = int(done.stdout.splitlines()[-1])
        table.add_row(part, f"{(rss - before) / MB:.0f} MB", f"{rss / MB:.0f} MB")
        before = rss
    return table


def sample_rss(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    process = psutil.Process(pid)
    started = time.monotonic()
    while not stop.wait(0.5):
        samples.append((time.monotonic() - started, process.memory_info().rss))


def measure(name: str, model_dir: Path, workdir: Path, args) -> None:
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    spec = {
        "id": "memory",
        "source": str(model_dir),
        "devices": ["cpu"],
        "max_batch_size": args.clients,
        "context_length": 512,
    }
    requests = [Request(r.prompt, args.max_tokens) for r in make_workload("a", args.jobs, seed=3)]
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    # Every job must reach the worker, even a prompt the workload happens to repeat.
    stack_dir = workdir / f"stack-{name}"
    stack_dir.mkdir()
    with llmq_stack([spec], stack_dir, ["memory"], LLMQ_CACHE="off") as (base, workers):
        worker = workers[1]  # [api, worker]
        asyncio.run(
            run_clients(
                requests[: args.clients * 4],
                args.clients,
                llmq_request(base, "memory", stream=False),
            )
        )
        after_warmup = psutil.Process(worker.pid).memory_info().rss
        sampler = threading.Thread(target=sample_rss, args=(worker.pid, samples, stop))
        sampler.start()
        result = asyncio.run(
            run_clients(requests, args.clients, llmq_request(base, "memory", stream=False))
        )
        stop.set()
        sampler.join()
        time.sleep(2)  # the engine hands freed memory back once idle
        idle = psutil.Process(worker.pid).memory_info().rss
        succeeded = httpx.get(f"{base}/v1/jobs", params={"status": "succeeded", "limit": 1})
    rss = [r for _, r in samples]
    end = samples[-1][0]
    tail = [r for t, r in samples if t > end * 0.9]
    table = Table(
        title=f"{name}: worker memory over {len(result.samples):,} jobs "
        f"({args.clients} clients, {args.max_tokens} tokens each)"
    )
    for column in [
        "model size",
        "RSS after warm-up",
        "RSS peak",
        "RSS last 10%",
        "RSS idle after",
        "peak − model",
        "jobs/s",
        "jobs stored",
    ]:
        table.add_column(column, justify="right")
    table.add_row(
        f"{model_bytes / MB:.1f} MB",
        f"{after_warmup / MB:.0f} MB",
        f"{max(rss) / MB:.0f} MB",
        f"{statistics.median(tail) / MB:.0f} MB",
        f"{idle / MB:.0f} MB",
        f"{(max(rss) - model_bytes) / MB:.0f} MB",
        f"{result.requests_per_s:.0f}",
        f"{succeeded.json()['total']:,}",
    )
    console.print(table)
    course = Table(title=f"{name}: resident memory (MB) at each tenth of the run")
    tenths = range(1, 11)
    for tenth in tenths:
        course.add_column(f"{tenth * 10}%", justify="right")
    course.add_row(
        *[f"{max(r for t, r in samples if t <= end * tenth / 10) / MB:.0f}" for tenth in tenths]
    )
    console.print(course)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories260K,llama-25m")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-memory-"))
    console.print(runtime_floor())
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        measure(name, model_dir, workdir, args)


if __name__ == "__main__":
    main()
