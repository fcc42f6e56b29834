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


class EngineAlone:
    """An engine in this process with workload (a)'s prompts, one per client, in one batch."""

    def __init__(self, name: str, model_dir: Path, workdir: Path, clients: int) -> None:
        from workers.engine import GenerationEngine
        from workers.host import ModelHost

        self.host = ModelHost.load(ModelSpec(id=name, source=str(model_dir)), "cpu", workdir)
        self.engine = GenerationEngine(
            self.host, max_batch_size=clients, max_batch_tokens=1_000_000, max_wait_ms=10
        )
        self.engine.start()
        self.prompts = [self.host.encode(r.prompt) for r in make_workload("a", clients)]

    def tokens_per_s(self, params: SamplingParams) -> float:
        """Every prompt under these params at once: generated tokens over the wall time."""
        from workers.engine import GenerationRequest

        started = time.perf_counter()
        submit = self.engine.submit
        futures = [submit(GenerationRequest(uuid.uuid4(), p, params)) for p in self.prompts]
        tokens = sum(future.result(timeout=600).completion_tokens for future in futures)
        return tokens / (time.perf_counter() - started)

    @staticmethod
    def rounds(run, variants: dict, repeats: int) -> dict[str, list]:
        """run(variant) for each variant, round after round (after one warm-up round), so that
        other work on the machine weighs on all alike."""
        for variant in variants.values():
            run(variant)
        results: dict[str, list] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, variant in variants.items():
                results[name].append(run(variant))
        return results

    def stop(self) -> None:
        self.engine.stop()


def bench_model(name: str, model_dir: Path, workdir: Path, args) -> Table:
    alone = EngineAlone(name, model_dir, workdir, args.clients)

    def run(settings: dict) -> float:
        return alone.tokens_per_s(SamplingParams(max_tokens=TOKENS, ignore_eos=True, **settings))

    try:
        rates = alone.rounds(run, VARIANTS, args.repeats)
    finally:
        alone.stop()
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
