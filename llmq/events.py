"""Token events: what a worker publishes for each job and what the stream endpoints replay.

Per job, every event goes to two places in one Redis round trip per decode step:
- a capped stream `llmq:events:<job id>` (with a TTL): the replay buffer for late joiners and
  clients that reconnect with Last-Event-ID;
- the pub/sub channel of the same name: the live feed.
Stream entry ids are the event ids a client sees (SSE `id:`): token events take `<n>-0` for the
n-th delta of the job, final events an id Redis assigns (a timestamp, so always later). A reader
that merges the buffer with the live feed drops every id it has already passed.
"""

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

EVENTS_PREFIX = "llmq:events:"
FINAL_PREFIX = "llmq:final:"
REPLAY_MAXLEN = 100_000
REPLAY_TTL_S = 3600


def events_key(job_id: uuid.UUID | str) -> str:
    return f"{EVENTS_PREFIX}{job_id}"


def final_channel(job_id: uuid.UUID | str) -> str:
    """A channel with only the job's final event, for waiters that need no tokens."""
    return f"{FINAL_PREFIX}{job_id}"


def token_event_id(n: int) -> str:
    """The stream id of the n-th (from 1) token event of a job."""
    return f"{n}-0"


def parse_event_id(event_id: str) -> tuple[int, int]:
    """Stream ids order as pairs of integers; ValueError for anything else."""
    first, _, second = event_id.partition("-")
    return int(first), int(second or 0)


class TokenEvent(BaseModel):
    type: Literal["token"] = "token"
    job_id: uuid.UUID
    token_index: int  # position of the newest token this delta covers
    text: str
    # Unix time at which the worker made the delta (None when rebuilt from Postgres): with it a
    # client can tell how long the stream took to bring each token.
    created: float | None = None
    # When the job asked for log-probabilities: those of the tokens this delta covers, each
    # [token id, logprob, [[id, logprob], ...] best first] (llmq/logprobs.py).
    logprobs: list | None = None


class JobEnding(BaseModel):
    """What a read of a succeeded job shows beside its text and token counts, as the worker
    stored it: sent with the job's final event on its final channel, so that a request waiting
    there can answer without reading the job back. Streams and replay buffers do not carry it."""

    attempts: int
    started_at: datetime | None
    finished_at: datetime
    time_to_first_token_ms: float | None
    duration_ms: float
    cost: Decimal | None  # as its usage row stored it; None: the model had no price
    currency: str | None


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    job_id: uuid.UUID
    status: str
    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    # {"prompt": [...] | None, "completion": [...] | None} when the job asked for them.
    logprobs: dict | None = None
    # Only on the final channel, from the worker that stored the job (llmq/publisher.py).
    ending: JobEnding | None = Field(default=None, exclude_if=lambda ending: ending is None)


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    job_id: uuid.UUID
    category: str
    message: str


JobEvent = TokenEvent | DoneEvent | ErrorEvent
