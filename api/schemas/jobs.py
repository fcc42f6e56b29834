"""Request and response bodies of the job API (`JobCreate` in, `JobPublic` out)."""

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from sqlalchemy import inspect as sa_inspect

from api.schemas.logprobs import JobLogprobs, TokenTexts, job_logprobs
from api.schemas.output_formats import OutputFormatFields
from db.queries.jobs import Outcome
from db.tables import Job
from db.tables import JobResult as JobResultRow
from db.tables import Usage as UsageRow
from llmq.events import DoneEvent
from llmq.pricing import format_amount
from llmq.protocol import (
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_LOGPROBS,
    JobStatus,
)

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


# A token id as the prompt, stop_token_ids and logit_bias take it; the model's vocabulary
# bounds it further when the request is planned.
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[
    int,
    BeforeValidator(_whole_number),
    Field(ge=0, le=MAX_TOKEN_ID),
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}),
]
TOKEN_IDS_SCHEMA = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
    "minItems": 1,
}
PROMPT_TEXT_SCHEMA = {"type": "string", "minLength": 1}
PROMPT_KINDS = "a non-empty string or a non-empty list of token ids"


def _token_ids(value: list) -> list[int] | None:
    """The list as token ids, if it is one (JSON numbers 5 and 5.0 alike); None if not."""
    if not value or not all(
        isinstance(item, int | float) and not isinstance(item, bool) for item in value
    ):
        return None
    ids = [int(item) if float(item).is_integer() else item for item in value]
    for position, token in enumerate(ids):
        if not isinstance(token, int) or not 0 <= token <= MAX_TOKEN_ID:
            raise ValueError(
                f"prompt token ids are whole numbers from 0 to {MAX_TOKEN_ID}; item "
                f"{position} is {value[position]!r}"
            )
    return ids


def one_prompt(value: object) -> str | list[int]:
    """A prompt: its text, or its token ids."""
    if isinstance(value, str):
        if not value:
            raise ValueError("prompt is empty: it needs at least 1 character, or 1 token id")
        return reject_nul(value, "prompt")
    if isinstance(value, list):
        if not value:
            raise ValueError(f"prompt is an empty list; send {PROMPT_KINDS}")
        ids = _token_ids(value)
        if ids is not None:
            return ids
    raise ValueError(f"prompt must be {PROMPT_KINDS}")


def some_prompts(value: object) -> str | list[int] | list[str] | list[list[int]]:
    """One prompt (text or token ids), or a list of prompts of one kind."""
    if isinstance(value, list) and value and all(isinstance(item, str | list) for item in value):
        prompts = [one_prompt(item) for item in value]
        if len({type(prompt) for prompt in prompts}) > 1:
            raise ValueError("a list of prompts holds texts or lists of token ids, not both")
        return prompts
    try:
        return one_prompt(value)
    except ValueError as exc:
        raise ValueError(f"{exc}, or a list of such prompts") from None


Prompt = Annotated[
    str | list[int],
    BeforeValidator(one_prompt),
    WithJsonSchema(
        {
            "anyOf": [PROMPT_TEXT_SCHEMA, TOKEN_IDS_SCHEMA],
            "description": "The prompt's text, or its token ids.",
            "examples": ["Once upon a time"],
        }
    ),
]


def logit_bias(value: object) -> object:
    """OpenAI's logit_bias: token ids (as JSON object keys, so strings) to a bias in
    [-100, 100]; returned with integer keys."""
    if not isinstance(value, dict):
        raise ValueError("logit_bias must be an object of token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(value)} entries; send at most {MAX_LOGIT_BIAS}")
    bias: dict[int, float] = {}
    for key, number in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"logit_bias key {key!r} is not a token id (a whole number >= 0)")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"logit_bias[{key!r}] must be a number in [-100, 100]")
        if not -100 <= number <= 100:
            raise ValueError(f"logit_bias[{key!r}] is {number}; the allowed range is [-100, 100]")
        bias[int(key)] = float(number)
    return bias


LogitBias = Annotated[
    dict[int, float],
    BeforeValidator(logit_bias),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": MAX_LOGIT_BIAS,
            "description": "Token id → a bias in [-100, 100] added to its logit.",
        }
    ),
]


def alternatives_field(description: str):
    """A count of log-probability alternatives per token (logprobs, top_logprobs, ...)."""
    return Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, description=description)


class SamplingExtras(OutputFormatFields):
    """Sampling fields that the job API and the OpenAI endpoints share beyond temperature,
    top_p and top_k: penalties, logit_bias, min_p, stop tokens, prompt truncation and output
    constraints. Each is applied per row inside the batched step (workers/sampling.py)."""

    model_config = STRICT_INPUT

    presence_penalty: float | None = Field(
        default=None,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from the logit of every token generated so far.",
    )
    frequency_penalty: float | None = Field(
        default=None,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from a token's logit once per time it was generated.",
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description="Transformers' and vLLM's: a token of the prompt or the output has its "
        "logit divided by this (multiplied when negative). 1 leaves it off.",
    )
    logit_bias: LogitBias | None = None
    min_p: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Drop tokens less likely than min_p times the likeliest one.",
    )
    stop_token_ids: list[TokenId] | None = Field(
        default=None,
        max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end the text as EOS does (not part of the text).",
    )
    min_tokens: JsonInt = Field(
        default=0,
        ge=0,
        le=MAX_TOKENS_LIMIT,
        description="Tokens generated before EOS or a stop token may end the text.",
    )
    truncate_prompt_tokens: JsonIntOrNone = Field(
        default=None,
        ge=1,
        le=MAX_JSON_INT,
        description="Keep only the prompt's last this many tokens.",
    )

    def extra_sampling(self, max_tokens: int) -> dict[str, Any]:
        """These fields as SamplingParams keywords (a 400 for a constraint that cannot be
        enforced)."""
        return {
            "constraint": self.checked_constraint(),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "logit_bias": dict(self.logit_bias or {}),
            "min_p": self.min_p or 0.0,
            "stop_token_ids": list(self.stop_token_ids or []),
            "min_tokens": min(self.min_tokens, max_tokens),
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
        }

    def token_ids_used(self) -> list[tuple[str, int]]:
        """(field, token id) of every token id these fields name, to check against the model's
        vocabulary."""
        named = [("logit_bias", token) for token in self.logit_bias or {}]
        return named + [("stop_token_ids", token) for token in self.stop_token_ids or []]


class JobCreate(SamplingExtras):
    """A text-generation job. Unset sampling fields take the model's defaults."""

    model_config = ConfigDict(
        **STRICT_INPUT,
        json_schema_extra={
            "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
            "then": {
                "properties": {"prompt_logprobs": {"type": "integer"}},
                "required": ["prompt_logprobs"],
            },
        },
    )

    model: str = Field(min_length=1, max_length=200, examples=["stories260K"])
    # Capped at LLMQ_MAX_PROMPT_CHARS when submitted (a setting, so not a schema bound).
    prompt: Prompt
    # 0 only with prompt_logprobs: the prompt is scored, nothing is generated.
    max_tokens: JsonIntOrNone = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
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
    logprobs: JsonIntOrNone = alternatives_field(
        "Store each generated token's log-probability with this many likeliest alternatives "
        "(the result's logprobs.completion)."
    )
    prompt_logprobs: JsonIntOrNone = alternatives_field(
        "The same for the prompt's tokens (logprobs.prompt; the first has none)."
    )

    @model_validator(mode="after")
    def nothing_to_do(self):
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError(
                "max_tokens 0 generates nothing; it is only allowed with prompt_logprobs. "
                "Send max_tokens >= 1"
            )
        return self

    def token_ids_used(self) -> list[tuple[str, int]]:
        given = self.prompt if isinstance(self.prompt, list) else []
        return [("prompt", token) for token in given] + super().token_ids_used()

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class CostPublic(BaseModel):
    """An amount of money: its exact decimal digits, as a string, and its currency."""

    amount: str = Field(examples=["0.0000125"])
    currency: str = Field(examples=["USD"], description="ISO 4217 code")

    @classmethod
    def of(cls, amount: Decimal, currency: str) -> "CostPublic":
        return cls(amount=format_amount(amount), currency=currency)


def costs_public(costs: dict[str, Decimal]) -> list[CostPublic]:
    """Amounts per currency, in currency order."""
    return [CostPublic.of(amount, currency) for currency, amount in sorted(costs.items())]


# An extension of a usage object: absent, rather than null, when the model has no price.
CostField = Field(
    default=None,
    exclude_if=lambda cost: cost is None,
    description="What the tokens cost at the model's price when the job finished; absent when "
    "the model has no price",
)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: CostPublic | None = CostField


class ResultPublic(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    time_to_first_token_ms: float | None
    duration_ms: float
    logprobs: JobLogprobs | None = Field(
        default=None, description="When the job asked for logprobs or prompt_logprobs"
    )


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
    def from_row(cls, job: Job, texts: TokenTexts | None = None) -> "JobPublic":
        """The job as the API shows it; `texts` turns stored log-probabilities' token ids into
        text (a job with none needs none)."""
        result = None
        if job.result is not None:
            r = job.result
            logprobs = None
            if r.logprobs is not None and texts is not None:
                logprobs = job_logprobs(texts, r.logprobs)
            result = _result_public(r, _cost_of(job), logprobs)
        error = None
        if job.error_category is not None:
            error = JobError(category=job.error_category, message=job.error_message or "")
        return cls(
            **_submitted(job),
            status=JobStatus(job.status),
            attempts=job.attempts,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=result,
            error=error,
        )

    @classmethod
    def from_done_event(cls, job: Job, done: DoneEvent) -> "JobPublic | None":
        """The job as a read would show it once it has ended, from its row as submitted and
        the final event of the worker that stored it; None when the event cannot tell it all
        (no `ending`, or log-probabilities to show as text): read the job then."""
        ending = done.ending
        if ending is None or done.logprobs is not None:
            return None
        result = _result_public(
            Outcome(
                done.text,
                done.finish_reason,
                done.prompt_tokens,
                done.completion_tokens,
                ending.time_to_first_token_ms,
                ending.duration_ms,
            ),
            _cost_public(ending.cost, ending.currency),
        )
        return cls(
            **_submitted(job),
            status=JobStatus(done.status),
            attempts=ending.attempts,
            started_at=ending.started_at,
            finished_at=ending.finished_at,
            result=result,
        )


def _result_public(
    r: Outcome | JobResultRow, cost: CostPublic | None, logprobs: JobLogprobs | None = None
) -> ResultPublic:
    return ResultPublic(
        text=r.text,
        finish_reason=r.finish_reason,
        usage=Usage(
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            total_tokens=r.prompt_tokens + r.completion_tokens,
            cost=cost,
        ),
        time_to_first_token_ms=r.time_to_first_token_ms,
        duration_ms=r.duration_ms,
        logprobs=logprobs,
    )


def _cost_public(cost: Decimal | None, currency: str | None) -> CostPublic | None:
    return CostPublic.of(cost, currency) if cost is not None and currency is not None else None


def _submitted(job: Job) -> dict[str, Any]:
    """What a job's answer takes from its row as it was submitted."""
    return {
        "id": job.id,
        "kind": job.kind,
        "model": job.model,
        "queue": job.queue,
        "prompt": job.input.get("prompt", ""),
        "params": job.params,
        "created_at": job.created_at,
        "request_id": job.request_id,
        "cache_hit": job.cache_hit,
        "follows_job_id": job.follows_job_id,
    }


def _cost_of(job: Job) -> CostPublic | None:
    # Filled in by the queries that answer reads; never loaded here (a query per job).
    usage = sa_inspect(job).attrs.usage.loaded_value
    if not isinstance(usage, UsageRow):
        return None
    return _cost_public(usage.cost, usage.currency)


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
    workers: list[str] = Field(
        default_factory=list, description="The live workers that consume one of its queues"
    )
    loaded_on: list[str] = Field(
        default_factory=list,
        description="Those of them that have it loaded now (a worker of several models loads "
        "them as their jobs come)",
    )
    circuit_breaker: str | None = Field(
        default=None,
        description="A remote model's upstream breaker: closed, half-open or open (None: local)",
    )


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
    cost: list[CostPublic] = Field(
        description="What the window's finished jobs cost, per currency (priced models only)"
    )
    errors: dict[str, int] = Field(description="Failed jobs by error category")


class StatsPublic(BaseModel):
    object: str = "stats"
    window_s: int
    since: datetime
    data: list[ModelStatsPublic]
