"""Request and response bodies of the job API (`JobCreate` in, `JobPublic` out)."""

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from db.tables import Job
from llmq.protocol import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, JobStatus

STRICT_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# The largest integer every JSON reader holds exactly (I-JSON, RFC 7493). The OpenAPI document
# carries bounds as doubles: 2**63 - 1 would be published as 2**63, which the API refuses.
MAX_JSON_INT = 2**53 - 1


def _whole_number(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema counts them (the published document's rules): 5 and 5.0, but
# neither true nor "5", which strict models refuse.
JsonInt = Annotated[int, BeforeValidator(_whole_number)]
# Not `JsonInt | None`: pydantic would publish that one's bounds under the wrong keywords.
JsonIntOrNone = Annotated[int | None, BeforeValidator(_whole_number)]


def reject_nul(text: str, field: str) -> str:
    """Postgres text cannot store NUL, and no model needs it."""
    if "\x00" in text:
        raise ValueError(f"{field} contains a NUL character (\\u0000); remove it")
    return text


def stop_sequences(value: object) -> object:
    """OpenAI's `stop`: a string is one stop sequence, not a list of its characters."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"stop has {len(value)} sequences; send at most {MAX_STOP_STRINGS}")
    if "" in value:
        raise ValueError("a stop sequence cannot be empty; leave it out")
    return value


_STOP_TEXT = {"type": "string", "minLength": 1}
# Always a list once validated. The schema is written out because the validator, not the type,
# accepts the single string.
StopSequences = Annotated[
    list[str],
    BeforeValidator(stop_sequences),
    WithJsonSchema(
        {
            "anyOf": [
                _STOP_TEXT,
                {"type": "array", "items": _STOP_TEXT, "maxItems": MAX_STOP_STRINGS},
            ],
            "description": f"One stop sequence, or a list of up to {MAX_STOP_STRINGS}. The text "
            "ends before the first of them that is generated.",
        }
    ),
]


class JobCreate(BaseModel):
    """A text-generation job. Unset sampling fields take the model's defaults."""

    model_config = STRICT_INPUT

    model: str = Field(min_length=1, max_length=200, examples=["tiny-llama"])
    # Capped at LLMQ_MAX_PROMPT_CHARS when submitted (a setting, so not a schema bound).
    prompt: str = Field(min_length=1, examples=["Once upon a time"])
    max_tokens: JsonIntOrNone = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: JsonIntOrNone = Field(default=None, ge=0, le=100_000)
    seed: JsonIntOrNone = Field(default=None, ge=0, le=MAX_JSON_INT)
    stop: StopSequences | None = None
    ignore_eos: bool = Field(default=False, description="Generate exactly max_tokens tokens.")
    cache: bool = Field(
        default=True,
        description="A deterministic job (temperature 0, or a seed) may be answered from the "
        "completion cache, or share the run of an identical job in flight. false: run it anew.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="Fail the job (category timeout) if it runs longer than this many seconds. "
        "Default: the model's timeout_s, else the server's job time limit.",
    )

    @field_validator("prompt")
    @classmethod
    def prompt_has_no_nul(cls, prompt: str) -> str:
        return reject_nul(prompt, "prompt")

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResultPublic(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    time_to_first_token_ms: float | None
    duration_ms: float


class JobError(BaseModel):
    category: str
    message: str


class JobPublic(BaseModel):
    id: uuid.UUID
    object: str = "job"
    kind: str
    model: str
    queue: str
    status: JobStatus
    prompt: str
    params: dict[str, Any]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request_id: str | None = Field(
        default=None, description="The X-Request-ID of the request that submitted the job"
    )
    cache_hit: bool = Field(
        default=False, description="Answered from the completion cache; it never ran"
    )
    follows_job_id: uuid.UUID | None = Field(
        default=None,
        description="The identical job whose run this one shares: it gets that job's outcome "
        "instead of running itself",
    )
    result: ResultPublic | None = None
    error: JobError | None = None

    @classmethod
    def from_row(cls, job: Job) -> "JobPublic":
        result = None
        if job.result is not None:
            r = job.result
            result = ResultPublic(
                text=r.text,
                finish_reason=r.finish_reason,
                usage=Usage(
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    total_tokens=r.prompt_tokens + r.completion_tokens,
                ),
                time_to_first_token_ms=r.time_to_first_token_ms,
                duration_ms=r.duration_ms,
            )
        error = None
        if job.error_category is not None:
            error = JobError(category=job.error_category, message=job.error_message or "")
        return cls(
            id=job.id,
            kind=job.kind,
            model=job.model,
            queue=job.queue,
            status=JobStatus(job.status),
            prompt=job.input.get("prompt", ""),
            params=job.params,
            attempts=job.attempts,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            request_id=job.request_id,
            cache_hit=job.cache_hit,
            follows_job_id=job.follows_job_id,
            result=result,
            error=error,
        )


class JobsPublic(BaseModel):
    object: str = "list"
    data: list[JobPublic]
    total: int
    limit: int
    offset: int


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "llmq"
    source: str
    devices: list[str]
    queues: list[str]
    context_length: int
    max_batch_size: int
    live: bool = Field(description="True when at least one worker consumes one of its queues")
    live_queues: list[str]


class ModelsPublic(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class PercentilesPublic(BaseModel):
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None


class LatencyPublic(BaseModel):
    end_to_end: PercentilesPublic = Field(description="Submitted → finished, succeeded jobs")
    queue_wait: PercentilesPublic = Field(description="Submitted → started by a worker")
    time_to_first_token: PercentilesPublic = Field(description="Started → first token")
    time_per_output_token: PercentilesPublic = Field(
        description="Time after the first token over the tokens after the first"
    )


class ThroughputPublic(BaseModel):
    jobs_per_s: float = Field(description="Succeeded jobs over the window")
    completion_tokens_per_s: float


class TokensPublic(BaseModel):
    prompt: int
    completion: int
    total: int


class ModelStatsPublic(BaseModel):
    model: str
    jobs: dict[str, int] = Field(description="submitted, then the count in each status now")
    latency_ms: LatencyPublic
    throughput: ThroughputPublic
    tokens: TokensPublic
    errors: dict[str, int] = Field(description="Failed jobs by error category")


class StatsPublic(BaseModel):
    object: str = "stats"
    window_s: int
    since: datetime
    data: list[ModelStatsPublic]
