"""Models the benchmarks run: the pretrained stories260K that ships with llmq (its default model),
and a seeded ~25M Llama."""

from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "models" / "stories260K"
# GSM8K and MMLU in their original formats, where the checkout has ../shared beside it.
SHARED_DATA = ROOT.parent / "shared" / "data"


LLAMA_25M_SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "initializer_range": 0.02,
}


def ensure_llama_25m(path: Path, seed: int = 25) -> Path:
    """A seeded random Llama of about 25M parameters (compute-bound on a CPU) with the tiny
    byte-level tokenizer, written with save_pretrained like any real model."""
    from llmq.tiny_model import ensure_tiny_model

    return ensure_tiny_model(path, seed=seed, **LLAMA_25M_SHAPE)


def benchmark_models(
    names: str, workdir: Path, say: Callable[[str], None] = print
) -> Iterator[tuple[str, Path]]:
    """Each named model (comma-separated) with its folder."""
    for name in names.split(","):
        if name == "stories260K":
            yield name, STORIES
        elif name == "llama-25m":
            yield name, ensure_llama_25m(workdir / "llama-25m")
        else:
            raise SystemExit(f"unknown benchmark model {name!r}")
