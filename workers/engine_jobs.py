"""What goes into the engine and what comes out of it: requests, outputs and the errors a job's
future may hold. Plain data, free of torch, so a process that holds no model (the API's tools, a
remote model's worker) can use the job path around the engine."""

import uuid
from dataclasses import dataclass
from functools import cached_property

from llmq.protocol import BATCH_PRIORITY, ErrorCategory, FinishReason, SamplingParams

# A token's log-probability and its best alternatives: (token id, logprob, ((id, logprob), ...)).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


class JobFailed(Exception):
    """A job's failure whose category the engine knows (a remote model's upstream errors)."""

    category = ErrorCategory.MODEL_ERROR


class JobTimeout(Exception):
    """The job ran past its deadline."""


class EngineStopped(Exception):
    """The engine shut down before the job finished."""


@dataclass(frozen=True)
class GenerationRequest:
    job_id: uuid.UUID
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() value
    priority: int = 0  # lower first: interactive jobs join the batch before batch-API lines
    timed: bool = False  # traced: its output carries EngineTimings for the job's spans
    stream_tokens: bool = True  # the job row's: see publishes_deltas

    @property
    def publishes_deltas(self) -> bool:
        return publishes_deltas(self.stream_tokens, self.priority)


def publishes_deltas(stream_tokens: bool, priority: int) -> bool:
    """Whether a job's text goes to the publisher as it is made; otherwise in one delta when it
    finishes. Nobody watches a background job (a Batch API line, an evaluation item) or a
    non-streamed request's job (its row's stream_tokens) token by token, and a delta per row per
    step would cost the decode loop more than the step."""
    return stream_tokens and priority < BATCH_PRIORITY


@dataclass(frozen=True)
class EngineTimings:
    """When a traced job passed the engine's stages (time.monotonic() seconds, which every
    process of the host shares) and what its batch was like: the worker's spans are made of
    these once the job ends, so that the engine thread builds no span and steps no slower."""

    submitted: float
    admitted: float | None  # its prefill began (None: it ended before, cancelled or failed)
    prefilled: float | None  # its first token could be chosen
    finished: float
    steps: int = 0  # decode steps of its batch while it was in it
    mean_batch_size: float = 0.0  # rows per step, averaged over those steps
    last_batch_size: int = 0  # rows of its batch at its last step


@dataclass(frozen=True)
class GenerationOutput:
    text: str  # exactly the concatenation of the job's token deltas
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    duration_ms: float
    # Each chosen token's log-probability and alternatives, when the job asked (EOS included).
    logprobs: list[TokenLogprob] | None = None
    # Each prompt token's (the first one's logprob None): the runner's, from a scoring pass.
    prompt_logprobs: list | None = None
    timings: EngineTimings | None = None  # when the request was timed


class ScoreTimeout(Exception):
    """The scoring job reached its deadline before its turn on the model."""


Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


@dataclass(frozen=True)
class ScoreRequest:
    job_id: uuid.UUID
    pairs: list[Pair]
    max_length: int
    deadline: float | None = None  # time.monotonic() value
    priority: int = 0  # BATCH_PRIORITY and above: a background job (an evaluation item)
    # Also each continuation token's log-probability with this many alternatives (a job's
    # prompt log-probabilities, echo in the OpenAI API); None: the sums only.
    top_logprobs: int | None = None
    # The job's span (a W3C traceparent) when it is traced: a remote model's upstream request
    # for it joins its trace.
    trace_context: str | None = None

    @cached_property
    def tokens(self) -> int:
        """About how many tokens its rows put through the model (shared rows counted once)."""
        return sum(self._row_lengths)

    @cached_property
    def longest_row(self) -> int:
        return max(self._row_lengths, default=0)

    @cached_property
    def _row_lengths(self) -> list[int]:
        rows = {tuple(context): len(continuation) for context, continuation in self.pairs}
        return [min(len(c) + n, self.max_length) for c, n in rows.items()]


@dataclass(frozen=True)
class ScoreOutput:
    loglikelihoods: list[float]
    greedy: list[bool]
    input_tokens: int  # tokens this job put through the model, shared rows counted once
    duration_ms: float
    # Per continuation, each token's entry, when the request asked for top_logprobs.
    token_logprobs: list[list[TokenLogprob]] | None = None
