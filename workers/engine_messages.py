"""What the worker process and its engine process (workers/engine_process.py) say to each other
over their pipe, and what the engine process is told to load."""

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from llmq.registry import Device, ModelSpec
from workers.engine import GenerationRequest
from workers.host import ModelFacts
from workers.scoring import ScoreRequest


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process loads, and how its engine batches."""

    model: ModelSpec
    device: Device
    data_dir: Path
    engine_options: dict[str, Any] = field(default_factory=dict)  # GenerationEngine's keywords
    log_level: str = "INFO"
    log_json: bool = True


# -- messages ---------------------------------------------------------------------------------


class Submit(NamedTuple):
    key: int  # the worker process's name for the job's future
    request: GenerationRequest | ScoreRequest


class Cancel(NamedTuple):
    job_id: uuid.UUID


class Stop(NamedTuple):
    timeout: float


class Ready(NamedTuple):
    facts: ModelFacts


class LoadFailed(NamedTuple):
    error: str


class Ended(NamedTuple):
    key: int
    output: Any  # GenerationOutput or ScoreOutput, None when it failed
    error: BaseException | None


# A token delta: (delta number, job id bytes, token index, text, created, logprobs or None).
Delta = tuple[int, bytes, int, str, float | None, list | None]


class CycleReport(NamedTuple):
    batch_sizes: list[int]  # rows of each decode step
    passes: list[tuple[str, float]]  # (kind, seconds) of each forward pass
    deltas: list[Delta]
    ended: list[Ended]
