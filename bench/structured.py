"""What structured output costs the batching engine, in process.

    python -m bench.structured [--models llama-25m,stories260K] [--clients 64] [--repeats 3]

An engine alone in this process runs bench.run's workload (a): `--clients` requests of a few
words, 64 tokens each, all in one batch: unconstrained (ignore_eos), and with every row under a
JSON Schema long enough to last the 64 tokens (an array of 40 bounded integers: rows end by
max_tokens, as the unconstrained ones do). The runs alternate round after round, so that other
work on the machine weighs on both alike. Prints generated tokens/s (medians over the rounds,
ratio to unconstrained), the time the engine spent masking logits per decode step (timed
around workers.constraints.mask_rows), and each of bench's schemas' compile time, first and
cached (a copy of the compiled grammar).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.logprobs import EngineAlone
from bench.models import benchmark_models
from llmq.constraints import OutputConstraint
from llmq.protocol import SamplingParams
from workers.threads import apply_thread_defaults

console = Console(width=140)
TOKENS = 64
LONG_ARRAY = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "minItems": 40,
    "maxItems": 40,
}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["name", "age"],
    },
    "order ($defs, anyOf, pattern)": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "quantity"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 10},
            "note": {"anyOf": [{"type": "string", "maxLength": 80}, {"type": "null"}]},
            "status": {"enum": ["open", "paid", "shipped"]},
        },
        "required": ["items", "status"],
    },
    "long array": LONG_ARRAY,
}


class MaskTimer:
    """Wraps the engine's mask_rows to add up the time it takes."""

    def __init__(self) -> None:
        import workers.engine as engine_module

        self.seconds, self.calls = 0.0, 0
        original = engine_module.mask_rows

        def timed(*args, **kwargs):
            started = time.perf_counter()
            original(*args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.calls += 1

        engine_module.mask_rows = timed


def bench_model(name: str, model_dir: Path, workdir: Path, args) -> list[Table]:
    timer = MaskTimer()
    alone = EngineAlone(name, model_dir, workdir, args.clients)
    variants = {
        "unconstrained": SamplingParams(max_tokens=TOKENS, ignore_eos=True),
        "JSON Schema": SamplingParams(
            max_tokens=TOKENS, constraint=OutputConstraint.json_schema(LONG_ARRAY)
        ),
    }

    def run(params: SamplingParams) -> tuple[float, float]:
        """(tokens/s, mask ms per step)"""
        timer.seconds, timer.calls = 0.0, 0
        rate = alone.tokens_per_s(params)
        return rate, timer.seconds * 1000 / max(timer.calls, 1)

    def compile_seconds(schema: dict) -> tuple[float, float]:
        constraint = OutputConstraint.json_schema(schema)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            alone.engine._constraints().matcher(constraint).result(timeout=60)
            times.append(time.perf_counter() - started)
        return times[0], times[1]

    try:
        compiled = {label: compile_seconds(schema) for label, schema in SCHEMAS.items()}
        rounds = alone.rounds(run, variants, args.repeats)
    finally:
        alone.stop()
    speed = Table(title=f"{name}: {args.clients} rows × {TOKENS} tokens, medians of {args.repeats}")
    for column in ("rows", "tokens/s", "runs (tokens/s)", "× unconstrained", "mask ms/step"):
        speed.add_column(column, justify="right")
    plain = statistics.median(rate for rate, _ in rounds["unconstrained"])
    for variant, values in rounds.items():
        rate = statistics.median(r for r, _ in values)
        mask = statistics.median(m for _, m in values)
        runs = ", ".join(f"{r:,.0f}" for r, _ in values)
        masking = f"{mask:.2f}" if variant != "unconstrained" else "–"
        speed.add_row(variant, f"{rate:,.0f}", runs, f"{rate / plain:.3f}", masking)
    compile_table = Table(title=f"{name}: compile a schema (tokenizer prepared in the first)")
    for column in ("schema", "first ms", "cached ms"):
        compile_table.add_column(column, justify="right")
    for label, (first, cached) in compiled.items():
        compile_table.add_row(label, f"{first * 1000:.1f}", f"{cached * 1000:.3f}")
    return [speed, compile_table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-25m,stories260K")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    apply_thread_defaults()
    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-structured-"))
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        for table in bench_model(name, model_dir, workdir, args):
            console.print(table)


if __name__ == "__main__":
    main()
