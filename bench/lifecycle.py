"""The model lifecycle's costs: switching a worker's loaded model, and serving several models
from one worker against one worker per model.

    python -m bench.lifecycle [--switches 5] [--requests 480] [--clients 24] [--tokens 16]
                              [--rounds 3]

1. Switch cost: one worker serving two models of a kind and holding one at a time; an
   operator's load of the other (POST /v1/admin/workers/{worker}/models/{model}/load) evicts
   the loaded one and loads the other (its engine process starts, loads the weights, warms up).
   Median of --switches loads, alternating, for the built-in tiny shape and the ~25M Llama.
2. Three models under an even mix (three copies of stories260K, requests in turn), three
   systems on the same cores in the same run: one worker holding all three, three workers of
   one model each, and one worker that may hold one at a time (it switches as jobs come).
   --rounds rounds of --requests /v1/completions each, from --clients clients; medians.
"""

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.models import STORIES, ensure_llama_25m
from bench.run import Client, Request, Sample, make_workload, post_json, run_clients
from bench.stack import llmq_stack
from llmq.tiny_model import ensure_tiny_model

console = Console(width=140)
MIX = ("mix-a", "mix-b", "mix-c")


def entry(model: str, folder: Path, max_batch_size: int = 32) -> dict:
    return {
        "id": model,
        "source": str(folder),
        "devices": ["cpu"],
        "max_batch_size": max_batch_size,
        "context_length": 512,
    }


def switch_seconds(
    kind: str, folders: dict[str, Path], switches: int, workdir: Path
) -> list[float]:
    """Seconds of each operator's load that evicts the other model of the worker."""
    models = [entry(model, folder) for model, folder in folders.items()]
    worker = [*folders, "--max-loaded-models=1"]
    with llmq_stack(models, workdir, [worker], port=8781, database="llmq_bench_life") as (base, _):
        name = httpx.get(f"{base}/v1/admin/workers", timeout=30).json()["data"][0]["name"]
        seconds = []
        order = list(folders)
        for number in range(switches):
            model = order[(number + 1) % 2]  # the first model is loaded at start
            started = time.perf_counter()
            answer = httpx.post(
                f"{base}/v1/admin/workers/{name}/models/{model}/load",
                params={"wait": 600},
                timeout=660,
            )
            answer.raise_for_status()
            assert answer.json()["state"] == "loaded", answer.text
            seconds.append(time.perf_counter() - started)
            console.print(f"  {kind}: load of {model} took {seconds[-1]:.2f} s")
        return seconds


def mixed_request(base: str):
    """One /v1/completions request; its model in turn from MIX."""
    turn = iter(range(10**9))

    async def one(client: Client, request: Request) -> Sample:
        body = {
            "model": MIX[next(turn) % len(MIX)],
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        started = time.perf_counter()
        tokens = (await post_json(client, base, "/v1/completions", body))["usage"][
            "completion_tokens"
        ]
        return Sample(time.perf_counter() - started, None, tokens, request.max_tokens)

    return one


def mix_throughput(workers: list, args, workdir: Path) -> list[tuple[float, float]]:
    """(requests/s, p50 seconds) of each round."""
    folders = {}
    for model in MIX:
        folders[model] = workdir / model
        if not folders[model].exists():
            shutil.copytree(STORIES, folders[model])
    models = [entry(model, folder, 64) for model, folder in folders.items()]
    with llmq_stack(models, workdir, workers, port=8782, database="llmq_bench_life") as (base, _):
        requests = [
            Request(r.prompt, args.tokens) for r in make_workload("a", args.requests, seed=7)
        ]
        asyncio.run(run_clients(requests[: args.clients * 2], args.clients, mixed_request(base)))
        rounds = []
        for number in range(args.rounds):
            shuffled = [Request(f"{r.prompt} {number}", r.max_tokens) for r in requests]
            result = asyncio.run(run_clients(shuffled, args.clients, mixed_request(base)))
            rounds.append((result.requests_per_s, result.latency(50)))
        return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switches", type=int, default=5)
    parser.add_argument("--requests", type=int, default=480)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmq-bench-lifecycle-") as tmp:
        workdir = Path(tmp)
        switches = {
            "tiny (built-in shape, 2 layers × 64)": switch_seconds(
                "tiny",
                {
                    f"tiny-{seed}": ensure_tiny_model(workdir / f"tiny-{seed}", seed=seed)
                    for seed in (1, 2)
                },
                args.switches,
                workdir,
            ),
            "llama-25m (8 layers × 512)": switch_seconds(
                "llama-25m",
                {f"llama-25m-{s}": ensure_llama_25m(workdir / f"llama-25m-{s}", s) for s in (1, 2)},
                args.switches,
                workdir,
            ),
        }
        table = Table(title=f"Model switch (eviction + load), median of {args.switches}")
        for column in ("model", "median s", "min s", "max s"):
            table.add_column(column)
        for kind, seconds in switches.items():
            table.add_row(
                kind,
                f"{statistics.median(seconds):.2f}",
                f"{min(seconds):.2f}",
                f"{max(seconds):.2f}",
            )
        console.print(table)

        systems = {
            "three single-model workers": list(MIX),
            "one worker, all three loaded": [[*MIX, "--max-loaded-models=3"]],
            "one worker, one loaded at a time": [[*MIX, "--max-loaded-models=1"]],
        }
        results = {}
        for system, workers in systems.items():
            console.print(f"[bold]{system}[/bold]")
            results[system] = mix_throughput(workers, args, workdir)
        baseline = statistics.median(r for r, _ in results["three single-model workers"])
        table = Table(
            title=f"Three stories260K models, even mix: {args.requests} completions × "
            f"{args.tokens} tokens, {args.clients} clients, median of {args.rounds}"
        )
        for column in ("system", "requests/s", "÷ three workers", "p50 ms"):
            table.add_column(column)
        for system, rounds in results.items():
            rate = statistics.median(r for r, _ in rounds)
            p50 = statistics.median(p for _, p in rounds)
            table.add_row(system, f"{rate:.1f}", f"{rate / baseline:.2f}×", f"{p50 * 1000:.0f}")
        console.print(table)


if __name__ == "__main__":
    main()
