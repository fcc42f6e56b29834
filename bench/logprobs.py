"""What log-probabilities and per-row logit processing cost the decode loop, in process.

    python -m bench.logprobs [--models stories260K,llama-25m] [--clients 64] [--repeats 5]

An engine alone in this process runs bench.run's workload (a): `--clients` requests of a few
words asking for 64 tokens each (ignore_eos), all in one batch. The same workload runs plain,
with `logprobs: 5` on every row, and with penalties and a logit bias on every row (the rows
then choose their tokens one by one). The runs alternate round after round, so that other work
on the machine weighs on all alike. Prints generated tokens/s, medians over the rounds, with the
ratio to the plain run of the same rounds.
"""

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from bench.run import make_workload
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from workers.threads import apply_thread_defaults

console = Console(width=140)
TOKENS = 64
VARIANTS = {
    "plain": {},
    "logprobs 5": {"logprobs": 5},
    "penalties + bias": {
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {5: 1.0},
    },
}


def bench_model(name: str, model_dir: Path, workdir: Path, args) -> Table:
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    host = ModelHost.load(ModelSpec(id=name, source=str(model_dir)), "cpu", workdir)
    engine = GenerationEngine(
        host, max_batch_size=args.clients, max_batch_tokens=1_000_000, max_wait_ms=10
    )
    engine.start()
    prompts = [host.encode(r.prompt) for r in make_workload("a", args.clients)]

    def run(settings: dict) -> float:
        params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, **settings)
        started = time.perf_counter()
        futures = [engine.submit(GenerationRequest(uuid.uuid4(), p, params)) for p in prompts]
        tokens = sum(future.result(timeout=600).completion_tokens for future in futures)
        return tokens / (time.perf_counter() - started)

    try:
        for settings in VARIANTS.values():  # warm-up
            run(settings)
        rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant, settings in VARIANTS.items():
                rates[variant].append(run(settings))
    finally:
        engine.stop()
    table = Table(title=f"{name}: {args.clients} rows × {TOKENS} tokens, medians of {args.repeats}")
    for column in ("rows ask for", "tokens/s", "runs (tokens/s)", "× plain"):
        table.add_column(column, justify="right")
    plain = statistics.median(rates["plain"])
    for variant, values in rates.items():
        median = statistics.median(values)
        runs = ", ".join(f"{value:,.0f}" for value in values)
        table.add_row(variant, f"{median:,.0f}", runs, f"{median / plain:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories260K")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    apply_thread_defaults()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-logprobs-"))
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        console.print(bench_model(name, model_dir, workdir, args))


if __name__ == "__main__":
    main()
