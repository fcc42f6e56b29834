"""Batch API benchmark, in one run on one stack:

1. the same chat requests as one batch (`/v1/files` + `/v1/batches`) versus sent by concurrent
   clients to `/v1/chat/completions`: wall time and tokens/s;
2. interactive latency on the same model while a batch runs, versus an idle system.

    python -m bench.batch [--lines 10000] [--clients 64] [--probe-lines 2000] [--repeats 3]

Uses stories260K, the model that ships with llmq (models/stories260K).
"""

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.models import STORIES
from bench.stack import llmq_stack

console = Console(width=140)
ENDED = ("completed", "failed", "expired", "cancelled")


def model_entry(background_share: float) -> dict:
    source = str(STORIES)
    return {
        "id": "bench-batch",
        "source": source,
        "devices": ["cpu"],
        "max_batch_size": 64,
        "context_length": 512,
        "background_share": background_share,
    }


def chat_body(prompt: str, max_tokens: int) -> dict:
    return {
        "model": "bench-batch",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def prompts(tag: str, count: int) -> list[str]:
    # Distinct per run, so that no run is answered from another's completion cache.
    return [f"{tag} {i}: once upon a time there was a little girl" for i in range(count)]


def run_batch(base: str, tag: str, lines: int, max_tokens: int) -> tuple[float, int]:
    """Wall seconds from upload to the output file, and completion tokens."""
    requests = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_body(p, max_tokens),
            }
        )
        + "\n"
        for i, p in enumerate(prompts(tag, lines))
    ).encode()
    with httpx.Client(base_url=base, timeout=600) as http:
        started = time.perf_counter()
        upload = http.post(
            "/v1/files",
            files={"file": ("b.jsonl", io.BytesIO(requests))},
            data={"purpose": "batch"},
        ).json()
        batch = http.post(
            "/v1/batches",
            json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions"},
        ).json()
        while batch["status"] not in ENDED:
            time.sleep(0.5)
            batch = http.get(f"/v1/batches/{batch['id']}").json()
        if batch["status"] != "completed" or batch["request_counts"]["failed"]:
            raise RuntimeError(f"the batch did not complete cleanly: {batch}")
        output = http.get(f"/v1/files/{batch['output_file_id']}/content").content
        wall = time.perf_counter() - started
    tokens = sum(
        json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
        for line in output.decode().splitlines()
    )
    return wall, tokens


async def run_clients(base: str, tag: str, lines: int, clients: int, max_tokens: int):
    todo = asyncio.Queue()
    for prompt in prompts(tag, lines):
        todo.put_nowait(prompt)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            while not todo.empty():
                prompt = todo.get_nowait()
                body = chat_body(prompt, max_tokens)
                response = await http.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                answer = response.json()
                tokens += answer["usage"]["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started, tokens


def interactive_latencies(base: str, tag: str, count: int, max_tokens: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=base, timeout=600) as http:
        for prompt in prompts(tag, count):
            started = time.perf_counter()
            http.post("/v1/chat/completions", json=chat_body(prompt, max_tokens)).raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


def latency_under_batch(base: str, tag: str, probe_lines: int, max_tokens: int) -> list[float]:
    """Interactive requests sent while a batch of `probe_lines` runs on the same model."""
    result: dict = {}

    def batch() -> None:
        result["batch"] = run_batch(base, f"{tag}-batch", probe_lines, max_tokens)

    runner = threading.Thread(target=batch)
    runner.start()
    time.sleep(5)  # the batch's lines are queued and running
    latencies = interactive_latencies(base, f"{tag}-probe", 20, max_tokens)
    runner.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--probe-lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--background-share", type=float, default=0.2, help="models.yaml background_share"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-batch-"))
    batch_runs, client_runs, idle, loaded = [], [], [], []
    with llmq_stack(
        [model_entry(args.background_share)], workdir, ["bench-batch"], LLMQ_AUTH="off"
    ) as (base, _):
        for r in range(args.repeats):
            batch_runs.append(run_batch(base, f"batch{r}", args.lines, args.max_tokens))
            client_runs.append(
                asyncio.run(
                    run_clients(base, f"clients{r}", args.lines, args.clients, args.max_tokens)
                )
            )
            idle.append(
                statistics.median(interactive_latencies(base, f"idle{r}", 20, args.max_tokens))
            )
            loaded.append(
                statistics.median(
                    latency_under_batch(base, f"load{r}", args.probe_lines, args.max_tokens)
                )
            )

    def rate(runs):
        return statistics.median(tokens / wall for wall, tokens in runs)

    def wall(runs):
        return statistics.median(w for w, _ in runs)

    model = "stories260K"
    table = Table(
        title=f"Batch API, {model}, {args.lines} chat requests × {args.max_tokens} tokens, "
        f"medians of {args.repeats}"
    )
    for column in ("path", "wall s", "tokens/s", "ratio"):
        table.add_column(column)
    base_rate = rate(client_runs)
    table.add_row(
        f"{args.clients} clients → /v1/chat/completions",
        f"{wall(client_runs):.1f}",
        f"{base_rate:,.0f}",
        "1.00×",
    )
    table.add_row(
        "one batch → /v1/batches",
        f"{wall(batch_runs):.1f}",
        f"{rate(batch_runs):,.0f}",
        f"{rate(batch_runs) / base_rate:.2f}×",
    )
    console.print(table)
    latency = Table(
        title=f"Interactive chat p50 of 20 requests, beside a {args.probe_lines}-line batch"
    )
    for column in ("system", "p50 ms", "ratio"):
        latency.add_column(column)
    idle_ms, loaded_ms = statistics.median(idle) * 1000, statistics.median(loaded) * 1000
    latency.add_row("idle", f"{idle_ms:.1f}", "1.00×")
    latency.add_row("batch running", f"{loaded_ms:.1f}", f"{loaded_ms / idle_ms:.2f}×")
    console.print(latency)


if __name__ == "__main__":
    main()
