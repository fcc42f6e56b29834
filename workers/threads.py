"""How a worker process's threads share the CPU: applied before torch loads, since libgomp reads
its settings when torch loads it. Values the operator already set are kept."""

import os


def apply_thread_defaults() -> None:
    # OpenMP threads spin briefly between the many small operations of a forward pass, then
    # sleep: waking them for every operation (OMP_WAIT_POLICY=PASSIVE) made evaluation decoding
    # about 1.4x slower, and spinning longer takes the cores the API and the Celery threads need
    # to admit an interactive job beside a running batch.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    # The per-step detokenization of a few tokens per row is microseconds of work; the Rust
    # tokenizer's thread pool would wake threads for it that fight those OpenMP threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
