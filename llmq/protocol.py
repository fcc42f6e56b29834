"""The contract between the API and the workers: task names, payloads and sampling parameters.

Both sides import this module; neither imports the other.
"""

import uuid
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmq.constraints import OutputConstraint

GENERATE_TASK = "llmq.generate"
SCORE_TASK = "llmq.score"
# Several jobs in one message: jobs sent at the same moment (concurrent requests, evaluation
# items), claimed and stored together.
GENERATE_GROUP_TASK = "llmq.generate_group"
SCORE_GROUP_TASK = "llmq.score_group"
# The message header that lists a group message's job ids, so that the reconciler reads them
# without decoding the body.
JOB_IDS_HEADER = "llmq_job_ids"

# Broker priorities. kombu's Redis transport keeps one list per step of a queue and always
# serves the lower step first, so interactive jobs overtake batch lines on the same model.
PRIORITY_STEPS = (0, 3, 6, 9)
INTERACTIVE_PRIORITY = 0
BATCH_PRIORITY = 9

MAX_TOKENS_LIMIT = 8192
MAX_STOP_STRINGS = 8
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # alternatives per token, as vLLM and OpenAI allow


# Where a generation job's input keeps its prompt as token ids (next to "prompt", its text).
PROMPT_TOKEN_IDS_FIELD = "prompt_token_ids"


class JobKind(StrEnum):
    GENERATE = "generate"
    SCORE = "score"  # log-likelihood of continuations (llmq.score)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class FinishReason(StrEnum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"


class ErrorCategory(StrEnum):
    INVALID_INPUT = "invalid_input"
    MODEL_ERROR = "model_error"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    INTERNAL = "internal"
    # A remote model's upstream answered what is not a valid response (workers/remote/).
    UPSTREAM_ERROR = "upstream_error"
    # A remote model's upstream could not be reached (or its breaker stayed open) until the
    # job's deadline.
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"


class SamplingParams(BaseModel):
    """Everything that shapes one job's output; stored with the job and read by the worker."""

    model_config = ConfigDict(extra="forbid")

    # 0 only with prompt_logprobs: the prompt is scored and nothing is generated (echo).
    max_tokens: int = Field(ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    # Tokens that end the text as EOS does (and, like it, are not part of the text).
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    # EOS and stop_token_ids are masked until then.
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    # OpenAI's: subtracted from a token's logit once it was generated (presence) and per time
    # it was generated (frequency); counts cover the generated tokens only.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Transformers' and vLLM's: the logit of a token in the prompt or the generated text is
    # divided by it when positive, multiplied when negative.
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    # Added to a token's logit before anything else (OpenAI's logit_bias).
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    # Log-probabilities of each generated token with this many alternatives (None: none).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # The same for the prompt's tokens (the first has none): echo in the OpenAI API.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # What the whole text must match (structured output), enforced token by token.
    constraint: OutputConstraint | None = None
    # Keep only the last N prompt tokens (vLLM's truncate_prompt_tokens): evaluations
    # left-truncate long few-shot prompts this way, as lm-evaluation-harness does.
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def something_to_do(self):
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens 0 generates nothing; it needs prompt_logprobs")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias or a penalty changes this row's logits before it is sampled."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or self.prompt_logprobs is not None

    def truncate_prompt(self, prompt_ids: list[int]) -> list[int]:
        if self.truncate_prompt_tokens is None:
            return prompt_ids
        return prompt_ids[-self.truncate_prompt_tokens :]


class GenerateTask(BaseModel):
    """The message on the queue: the job id only; the worker re-reads the job from Postgres."""

    job_id: uuid.UUID


MAX_CONTINUATIONS = 26


class ScoreInput(BaseModel):
    """A scoring job's input: the log-likelihood of each continuation after the prompt."""

    prompt: str
    continuations: list[str] = Field(min_length=1, max_length=MAX_CONTINUATIONS)


class ScoreParams(BaseModel):
    """A scoring job's settings; stored with the job and read by the worker."""

    model_config = ConfigDict(extra="forbid")

    # Tokens the model sees at most: a longer prompt + continuation loses its start.
    max_length: int = Field(ge=2)


class ScoreTask(BaseModel):
    """The message of a scoring job: the job id only, like GenerateTask."""

    job_id: uuid.UUID


class JobGroupTask(BaseModel):
    """The message of several jobs of one kind, queue and priority. Each job still has its own
    row, is claimed, completed or failed on its own, and is resent alone by the reconciler if
    the message is lost; one message and one claim serve them all."""

    job_ids: list[uuid.UUID] = Field(min_length=1, max_length=256)


ScoreGroupTask = GenerateGroupTask = JobGroupTask
