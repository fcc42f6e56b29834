"""What a decode step costs inside a busy worker, with the engine in its own process and in a
thread of the worker (LLMQ_ENGINE_PROCESS), against the engine alone in process.

    python -m bench.decode_step [--repeats 5] [--clients 64]

On stories260K, with bench.run's workload (a): `--clients` requests of a few words asking for
64 tokens each (ignore_eos). Alone, an engine in this process runs them with nothing else
going on. In a worker, `--clients` concurrent clients send them through the API of a real
stack (completion cache off), and the worker's /metrics gives the decode passes' time: the
change of `llmq_forward_pass_seconds{kind="decode"}`'s sum over that of its count. Each system
runs with the torch threads of an engine process (workers.engine_main.default_torch_threads)
and, but for the engine process, with torch's default. Every system is started first and the
runs alternate between them, round after round, so that other work on the machine weighs on
all alike. Medians over the rounds, with the ratio to the engine alone with as many threads.
"""

import argparse
import asyncio
import statistics
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.run import llmq_request, make_workload, run_clients
from bench.servers import free_port
from bench.stack import bench_urls, llmq_stack
from workers.threads import apply_thread_defaults

console = Console(width=140)
MODEL = "stories260K"
DATABASE = "llmq_bench_decode_step"
REDIS_DBS = (8, 9, 10)  # one per worker system; tests use 15, bench.jobpath 12, others 13


class DecodePasses:
    """The engine's observer: the decode passes' count and total seconds."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count, self.seconds = 0, 0.0

    def decode_step(self, batch_size: int) -> None:
        pass

    def forward_pass(self, kind: str, seconds: float) -> None:
        if kind == "decode":
            self.count += 1
            self.seconds += seconds


def alone(model_dir: Path, workdir: Path, clients: int, threads: int, stack: ExitStack):
    """A function that runs the workload once on an engine alone in this process and returns
    its mean decode pass (s)."""
    import torch

    from llmq.protocol import SamplingParams
    from llmq.registry import ModelSpec
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    host = ModelHost.load(ModelSpec(id=MODEL, source=str(model_dir)), "cpu", workdir)
    passes = DecodePasses()
    torch.set_num_threads(threads)  # read by the engine thread at its first operation
    engine = GenerationEngine(
        host, max_batch_size=clients, max_batch_tokens=1_000_000, max_wait_ms=10, observer=passes
    )
    engine.start()
    stack.callback(engine.stop)
    params = SamplingParams(max_tokens=64, ignore_eos=True)

    def run() -> float:
        passes.reset()
        prompts = [host.encode(r.prompt) for r in make_workload("a", clients)]
        futures = [engine.submit(GenerationRequest(uuid.uuid4(), p, params)) for p in prompts]
        for future in futures:
            future.result(timeout=600)
        return passes.seconds / passes.count

    run()  # warms up, and fixes the engine thread's torch threads
    return run


def decode_totals(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the worker's decode forward-pass histogram."""
    text = httpx.get(metrics_url, timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("kind") == "decode" and sample.name.endswith(("_sum", "_count")):
                found[sample.name.rsplit("_", 1)[1]] = sample.value
    return found["sum"], found["count"]


def in_worker(model_dir: Path, workdir: Path, clients: int, redis_db: int, stack, **env: str):
    """A function that runs the workload once through a real stack whose processes get `env`,
    and returns the worker's mean decode pass (s) and the clients' tokens/s."""
    spec = {
        "id": MODEL,
        "source": str(model_dir),
        "devices": ["cpu"],
        "max_batch_size": clients,
        "max_wait_ms": 10,
        "context_length": 512,
        "max_batch_tokens": 1_000_000,
    }
    metrics_port = free_port()
    settings = {"LLMQ_CACHE": "off", "LLMQ_WORKER_METRICS_PORT": str(metrics_port), **env}
    redis_url = f"{bench_urls()[1].rsplit('/', 1)[0]}/{redis_db}"
    workdir.mkdir()
    base, _ = stack.enter_context(
        llmq_stack(
            [spec], workdir, [MODEL], free_port(), redis_url, f"{DATABASE}_{redis_db}", **settings
        )
    )
    requests = make_workload("a", clients)
    one_request = llmq_request(base, MODEL, stream=False)

    def run() -> tuple[float, float]:
        before = decode_totals(f"http://127.0.0.1:{metrics_port}/metrics")
        result = asyncio.run(run_clients(requests, clients, one_request))
        after = decode_totals(f"http://127.0.0.1:{metrics_port}/metrics")
        return (after[0] - before[0]) / (after[1] - before[1]), result.tokens_per_s

    run()  # warm-up
    return run


def main() -> None:
    apply_thread_defaults()  # as in a worker, before torch loads
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-"))
    found = dict(benchmark_models(MODEL, workdir, console.print))
    if MODEL not in found:
        return
    import torch

    from workers.engine_main import default_torch_threads

    model_dir, clients = found[MODEL], args.clients
    default = torch.get_num_threads()
    ours = default_torch_threads() or default
    with ExitStack() as stack:
        # name: (torch threads, a function that runs the workload once)
        systems = {
            f"alone in process, {n}": (n, alone(model_dir, workdir, clients, n, stack))
            for n in sorted({ours, default})
        }
        for (name, threads, env), redis_db in zip(
            [
                (f"worker, engine process, {ours}", ours, {"LLMQ_ENGINE_PROCESS": "true"}),
                (f"worker, engine thread, {default}", default, {"LLMQ_ENGINE_PROCESS": "false"}),
                (
                    f"worker, engine thread, {ours}",
                    ours,
                    {"LLMQ_ENGINE_PROCESS": "false", "OMP_NUM_THREADS": str(ours)},
                ),
            ],
            REDIS_DBS,
            strict=True,
        ):
            where = workdir / f"stack-{redis_db}"
            systems[name] = (threads, in_worker(model_dir, where, clients, redis_db, stack, **env))
        runs: dict[str, list] = {name: [] for name in systems}
        for _ in range(args.repeats):
            for name, (_, run) in systems.items():
                runs[name].append(run())
    table = Table(title=f"{MODEL}: decode pass, {clients} rows × 64 tokens, {args.repeats} rounds")
    for column in ["where, torch threads", "decode pass ms", "÷ alone", "runs (ms)", "tok/s"]:
        table.add_column(column, justify="right")
    for name, (threads, _) in systems.items():
        passes = [r[0] if isinstance(r, tuple) else r for r in runs[name]]
        reference = statistics.median(runs[f"alone in process, {threads}"])
        tokens = [r[1] for r in runs[name] if isinstance(r, tuple)]
        table.add_row(
            name,
            f"{statistics.median(passes) * 1000:.2f}",
            f"{statistics.median(passes) / reference:.2f}×",
            ", ".join(f"{p * 1000:.1f}" for p in passes),
            f"{statistics.median(tokens):,.0f}" if tokens else "–",
        )
    console.print(table)


if __name__ == "__main__":
    main()
