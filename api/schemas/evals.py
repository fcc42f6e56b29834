"""Request and response bodies of the evaluation API (`EvalRunCreate` in, `EvalRunPublic` out)."""

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmq.evals.mmlu import SUBJECTS

STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class EvalRunCreate(BaseModel):
    """A benchmark run of one model. Unset fields take lm-evaluation-harness's defaults."""

    model_config = STRICT_INPUT

    benchmark: Literal["gsm8k", "mmlu"]
    model: str = Field(min_length=1, max_length=200, examples=["stories260K"])
    num_fewshot: int | None = Field(
        default=None, ge=0, le=64, description="Default: 5 for gsm8k, 0 for mmlu (as lm-eval)."
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Only the first N test items of each task (MMLU subject).",
    )
    subjects: list[str] | None = Field(
        default=None, min_length=1, description="MMLU subjects to run; default all 57."
    )
    dataset: str | None = Field(
        default=None,
        max_length=1000,
        description="A folder inside the server's evaluation data directory, as its path "
        "relative to it (parts of letters, digits, '.', '_', '-'; links must stay inside), or "
        "the benchmark's hub dataset (openai/gsm8k, cais/mmlu). Default: the folder named after "
        "the benchmark, else the hub.",
        examples=["gsm8k"],
    )

    @field_validator("subjects")
    @classmethod
    def known_subjects(cls, subjects: list[str] | None) -> list[str] | None:
        if subjects is None:
            return None
        unknown = [s for s in subjects if s not in SUBJECTS]
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; known: {', '.join(SUBJECTS)}")
        return list(dict.fromkeys(subjects))


class ScorePublic(BaseModel):
    value: float
    stderr: float | None = Field(description="Standard error, as lm-eval reports it")
    n: int = Field(description="Items the score is over")


class EvalScores(BaseModel):
    """The headline metrics, MMLU's categories, and every task (each MMLU subject)."""

    metrics: dict[str, ScorePublic]
    groups: dict[str, dict[str, ScorePublic]]
    tasks: dict[str, dict[str, ScorePublic]]


class EvalProgress(BaseModel):
    total: int
    done: int = Field(description="Items graded, failed ones included")
    failed: int
    in_flight: int = Field(description="Items whose job is queued or running")
    reused: int = Field(description="Items answered by an earlier run's result")
    items_per_s: float | None = Field(description="Items this run graded per second so far")
    eta_s: float | None = Field(description="Seconds left at that rate")


class EvalRunPublic(BaseModel):
    id: uuid.UUID
    object: str = "eval_run"
    benchmark: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    num_fewshot: int
    limit: int | None
    subjects: list[str] | None
    dataset: str = Field(
        description="The folder inside the evaluation data directory, or the hub id"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: EvalProgress
    scores: EvalScores | None = Field(
        description="Over the items graded so far while the run goes on; final once it ends"
    )
    error: str | None


class EvalRunsPublic(BaseModel):
    object: str = "list"
    data: list[EvalRunPublic]
    total: int
    limit: int
    offset: int


class EvalItemPublic(BaseModel):
    position: int
    task: str = Field(description="gsm8k, or the MMLU subject")
    doc_index: int = Field(description="The item's index in its task's test split")
    status: Literal["pending", "queued", "running", "succeeded", "failed"]
    prompt: str
    continuations: list[str] | None = Field(description="What was scored (MMLU)")
    output: str | None = Field(description="The generated text, or the letter scored highest")
    answer: dict[str, Any] | None = Field(
        description="The answer each GSM8K filter extracted, or MMLU's log-likelihoods"
    )
    gold: str
    correct: bool | None = Field(description="GSM8K: strict-match; MMLU: acc")
    metrics: dict[str, float] | None
    error: str | None
    job_id: uuid.UUID | None
    reused: bool


class EvalItemsPublic(BaseModel):
    object: str = "list"
    data: list[EvalItemPublic]
    total: int
    limit: int
    offset: int
