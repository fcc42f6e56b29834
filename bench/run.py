"""Throughput benchmark: llmq end to end against a one-generate-per-request server (baseline)
and one in-process batched `generate` (ceiling), on the same model and workload, in one run.

    python -m bench.run [--repeats 3] [--clients 64] [--models stories260K,llama-25m] [--quick]

Workloads: (a) every request asks for exactly 64 new tokens; (b) output lengths mixed from 8 to
256 tokens, where continuous batching matters (llmq is run with continuous and with static
micro-batching). Figures are medians over the repeats; the ceiling and llmq's non-streamed runs
alternate, round after round, and their ratio is also given round by round.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
from httpx_sse import aconnect_sse
from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.raw_http import Connection, read_completion
from bench.stack import baseline_server, llmq_stack

console = Console(width=180)
Measured = TypeVar("Measured")  # a run's result with a tokens_per_s
SHORT_JOB_TOKENS = 32

WORDS = "once upon a time there was a little girl named lily who liked to play in the park".split()


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Sample:
    latency_s: float
    ttft_s: float | None
    tokens: int
    max_tokens: int


@dataclass(frozen=True)
class RunResult:
    wall_s: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall_s

    def latency(self, q: float, short_only: bool = False) -> float:
        values = [
            s.latency_s for s in self.samples if not short_only or s.max_tokens <= SHORT_JOB_TOKENS
        ]
        return percentile(values, q)

    def ttft(self, q: float) -> float | None:
        values = [s.ttft_s for s in self.samples if s.ttft_s is not None]
        return percentile(values, q) if values else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_workload(kind: str, count: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        tokens = 64 if kind == "a" else rng.choice([8, 16, 32, 64, 128, 256])
        requests.append(Request(prompt, tokens))
    return requests


@dataclass
class Client:
    """One load client: the run's shared httpx client, for what needs a full client (the job
    API's SSE stream), and a keep-alive connection of its own by the hand-written client, for
    the requests that are timed by the hundred."""

    http: httpx.AsyncClient
    _connection: Connection | None = None

    async def connection(self, base: str) -> Connection:
        if self._connection is None:
            self._connection = await Connection.open(base)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


async def run_clients(requests: list[Request], clients: int, one_request) -> RunResult:
    """`clients` concurrent clients, each sending its share of the requests one after another."""
    pending = list(requests)
    samples: list[Sample] = []

    async def client(http: httpx.AsyncClient) -> None:
        own = Client(http)
        try:
            while pending:
                samples.append(await one_request(own, pending.pop()))
        finally:
            own.close()

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return RunResult(time.perf_counter() - started, samples)


async def post_json(client: Client, base: str, path: str, body: dict) -> dict:
    """POST `body` on the client's own connection; the answer, which must be a 200."""
    status, answer = await (await client.connection(base)).request(
        "POST", path, json.dumps(body).encode()
    )
    if status != 200:
        raise RuntimeError(f"{path} answered {status}: {answer[:400]!r}")
    return json.loads(answer)


def llmq_request(base: str, model: str, stream: bool):
    """One request to llmq's OpenAI-compatible /v1/completions, streamed or not."""

    async def one(client: Client, request: Request) -> Sample:
        body = {
            "model": model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        started = time.perf_counter()
        if not stream:
            tokens = (await post_json(client, base, "/v1/completions", body))["usage"][
                "completion_tokens"
            ]
            return Sample(time.perf_counter() - started, None, tokens, request.max_tokens)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        connection = await client.connection(base)
        first, tokens = await read_completion(connection, json.dumps(body).encode())
        return Sample(time.perf_counter() - started, first, tokens, request.max_tokens)

    return one


@dataclass
class Delivery:
    """How long SSE took to bring tokens after the worker made them (seconds)."""

    first: list[float] = field(default_factory=list)  # each job's first token
    live: list[float] = field(default_factory=list)  # tokens made after the stream was open


def sse_overhead_request(base: str, model: str, delivery: Delivery):
    """Job API + SSE: when the client saw a token minus when the worker made it (the token
    event's `created`; same machine, same clock)."""

    async def one(client: Client, request: Request) -> Sample:
        http = client.http
        body = {
            "model": model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "ignore_eos": True,
        }
        started = time.perf_counter()
        job = (await http.post(f"{base}/v1/jobs", json=body)).json()
        first = None
        async with aconnect_sse(http, "GET", f"{base}/v1/jobs/{job['id']}/events") as source:
            opened = time.time()
            async for event in source.aiter_sse():
                if event.event == "token":
                    seen, made = time.time(), json.loads(event.data)["created"]
                    if first is None:
                        first = time.perf_counter() - started
                        delivery.first.append(seen - made)
                    if made > opened:
                        delivery.live.append(seen - made)
                if event.event in ("done", "error"):
                    break
        latency = time.perf_counter() - started
        stored = (await http.get(f"{base}/v1/jobs/{job['id']}")).json()
        return Sample(
            latency, first, stored["result"]["usage"]["completion_tokens"], request.max_tokens
        )

    return one


def baseline_request(base: str):
    async def one(client: Client, request: Request) -> Sample:
        started = time.perf_counter()
        body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "ignore_eos": True}
        tokens = (await post_json(client, base, "/generate", body))["tokens"]
        return Sample(time.perf_counter() - started, None, tokens, request.max_tokens)

    return one


def run_ceiling(model_dir: Path, requests: list[Request]) -> RunResult:
    """All prompts in one left-padded batched generate, in process: no server, no queue."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    longest = max(r.max_tokens for r in requests)
    inputs = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    wall = time.perf_counter() - started
    # Useful tokens only: a static batch also computes past each request's own max_tokens.
    return RunResult(wall, [Sample(wall, None, r.max_tokens, r.max_tokens) for r in requests])


@contextmanager
def cpu_accounting(processes, shares: dict[str, float]):
    """CPU seconds spent by the API, the worker and this load generator while the block runs,
    added to `shares`."""
    named = {
        "api": psutil.Process(processes[0].pid),
        "worker": psutil.Process(processes[1].pid),
        "clients": psutil.Process(),
    }

    def seconds() -> dict[str, float]:
        return {k: p.cpu_times().user + p.cpu_times().system for k, p in named.items()}

    before, wall = seconds(), time.perf_counter()
    yield
    after = seconds()
    for k in named:
        shares[k] = shares.get(k, 0.0) + after[k] - before[k]
    shares["wall"] = shares.get("wall", 0.0) + time.perf_counter() - wall


def median_result(results: list[Measured]) -> Measured:
    """The run with the median tokens/s."""
    return sorted(results, key=lambda r: r.tokens_per_s)[len(results) // 2]


def fmt(value: float | None, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def report(title: str, rows: dict[str, RunResult], reference: dict[str, str]) -> None:
    table = Table(title=title)
    for column in [
        "system",
        "req/s",
        "tok/s",
        "p50 s",
        "p99 s",
        "TTFT p50 s",
        "short p50 s",
        *[f"÷ {name}" for name in reference.values()],
    ]:
        table.add_column(column, justify="right")
    for name, result in rows.items():
        ratios = [
            f"{result.tokens_per_s / rows[ref].tokens_per_s:.2f}×" if ref in rows else "–"
            for ref in reference
        ]
        table.add_row(
            name,
            fmt(result.requests_per_s),
            fmt(result.tokens_per_s),
            fmt(result.latency(50)),
            fmt(result.latency(99)),
            fmt(result.ttft(50)),
            fmt(result.latency(50, short_only=True))
            if any(s.max_tokens <= SHORT_JOB_TOKENS for s in result.samples)
            else "–",
            *ratios,
        )
    console.print(table)


def bench_model(name: str, model_dir: Path, args, workdir: Path) -> None:
    spec = {
        "source": str(model_dir),
        "devices": ["cpu"],
        "max_batch_size": args.clients,
        "max_wait_ms": 10,
        "context_length": 512,
        "max_batch_tokens": 1_000_000,
    }
    if args.join_every_steps:
        spec["join_every_steps"] = args.join_every_steps
    models = [{"id": name, **spec}, {"id": f"{name}-static", **spec, "scheduling": "static"}]
    # (a) one request per client, as one static batch would take them; (b) several per client,
    # so that new requests arrive while long ones still run.
    workloads = {
        "a": make_workload("a", args.clients),
        "b": make_workload("b", args.clients * args.requests_per_client, seed=1),
    }
    workloads = {w: r for w, r in workloads.items() if w in args.workloads}
    results: dict[str, dict[str, list[RunResult]]] = {w: {} for w in workloads}

    def repeat(workload: str, system: str, runs: int, fn) -> None:
        for _ in range(runs):
            results[workload].setdefault(system, []).append(fn())

    loaded_delivery, light_delivery = Delivery(), Delivery()

    def llmq(requests, model, stream=False, client=None):
        make = client or llmq_request(base, model, stream)
        return lambda: asyncio.run(run_clients(requests, args.clients, make))

    cpu_shares: dict[str, dict[str, float]] = {w: {} for w in workloads}
    # The workloads repeat greedy requests: with the completion cache on, every run after the
    # first would measure cache hits, not the engine.
    stack = llmq_stack(models, workdir, [name, f"{name}-static"], LLMQ_CACHE="off")
    with stack as (base, processes):
        for requests in workloads.values():  # warm-up, not counted
            llmq(requests[: args.clients], name)()
            llmq(requests[: args.clients], f"{name}-static")()
        # The ceiling and llmq alternate, round after round, so that a change in the machine's
        # speed during the run (other tenants of a shared host) weighs on both alike.
        for w, requests in workloads.items():
            for _ in range(args.repeats):
                repeat(w, "ceiling", 1, lambda r=requests: run_ceiling(model_dir, r))
                with cpu_accounting(processes[:2], cpu_shares[w]):
                    repeat(w, "llmq", 1, llmq(requests, name))
        if "a" in workloads:
            a = workloads["a"]
            repeat("a", "llmq, streamed", args.repeats, llmq(a, name, stream=True))
            repeat(
                "a",
                "llmq, job API + SSE",
                args.repeats,
                llmq(a, name, client=sse_overhead_request(base, name, loaded_delivery)),
            )
            light = [Request(r.prompt, 16) for r in a[:30]]
            asyncio.run(run_clients(light, 1, sse_overhead_request(base, name, light_delivery)))
        if "b" in workloads:
            b = workloads["b"]
            repeat("b", "llmq static", args.repeats, llmq(b, f"{name}-static"))
            shorts = [r for r in b if r.max_tokens <= SHORT_JOB_TOKENS]
            repeat("b", "llmq, short jobs alone", args.repeats, llmq(shorts, name))
    with baseline_server(model_dir) as base:
        baseline_runs = 1 if args.quick else args.repeats
        for w, requests in workloads.items():
            if w == "b" and args.quick:
                continue
            repeat(
                w,
                "baseline",
                baseline_runs,
                lambda r=requests: asyncio.run(
                    run_clients(r, args.clients, baseline_request(base))
                ),
            )

    titles = {
        "a": f"(a) {args.clients} requests × 64 tokens",
        "b": f"(b) {args.clients * args.requests_per_client} requests, 8–256 tokens",
    }
    for w in workloads:
        title = titles[w]
        rows = {system: median_result(runs) for system, runs in results[w].items()}
        reference = {"baseline": "baseline", "ceiling": "ceiling"}
        if w == "b":
            reference["llmq static"] = "static"
        report(
            f"{name}: {title}, {args.clients} clients, median of {args.repeats}", rows, reference
        )
    for w in workloads:
        by_round = [
            llmq.tokens_per_s / ceiling.tokens_per_s
            for llmq, ceiling in zip(results[w]["llmq"], results[w]["ceiling"], strict=True)
        ]
        console.print(
            f"{name}: ({w}) llmq ÷ ceiling, round by round: "
            + ", ".join(f"{r:.2f}×" for r in by_round)
            + f" (median {statistics.median(by_round):.2f}×)"
        )
    for label, delivery in [
        ("one client at a time", light_delivery),
        (f"{args.clients} clients", loaded_delivery),
    ]:
        for what, values in [
            ("first token (the stream opened after the POST)", delivery.first),
            ("tokens made after the stream opened", delivery.live),
        ]:
            if values:
                console.print(
                    f"{name}: SSE delivery after the worker made it, {label}, {what}, "
                    f"{len(values)}: p50 {percentile(values, 50) * 1000:.1f} ms, "
                    f"p99 {percentile(values, 99) * 1000:.1f} ms"
                )
    for w, shares in cpu_shares.items():
        console.print(
            f"{name}: CPU seconds during the llmq ({w}) runs, by process: "
            + ", ".join(f"{k} {v:.1f}" for k, v in shares.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=3, help="in workload (b)")
    parser.add_argument("--workloads", default="ab", help="a, b or ab")
    parser.add_argument("--models", default="stories260K,llama-25m")
    parser.add_argument("--quick", action="store_true", help="baseline once, and not on (b)")
    parser.add_argument(
        "--join-every-steps", type=int, default=None, help="the models' join_every_steps"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        bench_model(name, model_dir, args, workdir)


if __name__ == "__main__":
    main()
