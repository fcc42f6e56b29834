"""Completion cache: the latency of a cache hit against a miss, end to end, on the tiny model.

`python -m bench.cache` starts its own stack (its own database, the API and one worker of the
built-in tiny model) and sends one request at a time:
- job API: POST /v1/jobs until the result is available. A hit carries its result in the 202
  answer; a miss is followed on its SSE stream until its `done` event;
- OpenAI: POST /v1/completions, not streamed.
Each run sends `--pairs` new prompts (a miss each), then the same requests again (a hit each).
Figures are the medians over `--runs` runs of each run's percentiles, in milliseconds.
The stack runs without API keys: the cost of auth is measured on its own.
"""

import argparse
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.samples import Samples
from bench.stack import bench_urls, llmq_stack

MODEL = "tiny"
# Its own Postgres and Redis databases, so that it can run beside another benchmark.
DATABASE = "llmq_bench_cache"
REDIS_DB = 12
MAX_TOKENS = 16
console = Console()


def job_until_result(http: httpx.Client, prompt: str) -> dict:
    """POST /v1/jobs, then, unless the answer already has the result, its stream until done."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    job = http.post("/v1/jobs", json=body).raise_for_status().json()
    if job["status"] == "succeeded":
        return job
    with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        for line in response.iter_lines():
            if line == "event: done":
                return job
            if line == "event: error":
                raise RuntimeError(f"job {job['id']} failed")
    raise RuntimeError(f"the stream of job {job['id']} ended without a final event")


def completion(http: httpx.Client, prompt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return http.post("/v1/completions", json=body).raise_for_status().json()


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(http: httpx.Client, send, pairs: int, runs: int) -> tuple[Samples, Samples]:
    """(misses, hits): `pairs` new prompts, then the same requests again, in each run. The hits
    come after all the misses, so that no run is still finishing in the worker."""
    misses, hits = Samples(), Samples()
    for _ in range(runs):
        prompts = [f"Once upon a time {uuid.uuid4().hex}" for _ in range(pairs)]
        misses.runs.append([timed(lambda p=prompt: send(http, p)) for prompt in prompts])
        hits.runs.append([timed(lambda p=prompt: send(http, p)) for prompt in prompts])
    return misses, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=40, help="misses and hits per run")
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()
    spec = {
        "id": MODEL,
        "source": "builtin:tiny-llama",
        "devices": ["cpu"],
        "max_batch_size": 8,
        "context_length": 512,
    }
    endpoints = {"job API (POST → result)": job_until_result, "/v1/completions": completion}
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmq-bench-cache-") as workdir:
        redis_url = f"{bench_urls()[1].rsplit('/', 1)[0]}/{REDIS_DB}"
        stack = llmq_stack(
            [spec],
            Path(workdir),
            [MODEL],
            port=args.port,
            redis_url=redis_url,
            database=DATABASE,
            LLMQ_AUTH="off",
        )
        with stack as (base, _), httpx.Client(base_url=base, timeout=60) as http:
            for send in endpoints.values():  # warm-up, not counted
                measure(http, send, pairs=5, runs=1)
            for name, send in endpoints.items():
                results[name] = measure(http, send, args.pairs, args.runs)
            floor = Samples(
                [
                    [timed(lambda: http.get("/healthz")) for _ in range(args.pairs)]
                    for _ in range(args.runs)
                ]
            )
    table = Table(
        title=f"Completion cache, tiny model, {MAX_TOKENS} new tokens, one request at a time "
        f"(ms; medians of {args.runs} runs × {args.pairs} requests)"
    )
    for column in ("endpoint", "miss p50", "hit p50", "miss p90", "hit p90", "miss/hit p50"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for name, (misses, hits) in results.items():
        miss, hit = misses.percentile(50), hits.percentile(50)
        table.add_row(
            name,
            f"{miss:.2f}",
            f"{hit:.2f}",
            f"{misses.percentile(90):.2f}",
            f"{hits.percentile(90):.2f}",
            f"{miss / hit:.1f}×",
        )
    console.print(table)
    console.print(f"An empty request (GET /healthz) takes {floor.percentile(50):.2f} ms (p50).")


if __name__ == "__main__":
    main()
