"""Models the benchmarks run: the shared pretrained stories260K, and a seeded ~25M Llama."""

from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def ensure_llama_25m(path: Path) -> Path:
    """A seeded random Llama of about 25M parameters (compute-bound on a CPU) with the tiny
    byte-level tokenizer, written with save_pretrained like any real model."""
    from llmq.tiny_model import ensure_tiny_model

    shape = {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "initializer_range": 0.02,
    }
    return ensure_tiny_model(path, seed=25, **shape)


def benchmark_models(
    names: str, workdir: Path, say: Callable[[str], None] = print
) -> Iterator[tuple[str, Path]]:
    """Each named model (comma-separated) with its folder; stories260K only where ../shared has
    it."""
    for name in names.split(","):
        if name == "stories260K":
            if not SHARED_STORIES.is_dir():
                say(f"skipping stories260K: {SHARED_STORIES} is absent")
                continue
            yield name, SHARED_STORIES
        elif name == "llama-25m":
            yield name, ensure_llama_25m(workdir / "llama-25m")
        else:
            raise SystemExit(f"unknown benchmark model {name!r}")
