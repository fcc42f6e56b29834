"""OpenAI-compatible completions and chat completions, each choice a job on the queue.

Every choice is an ordinary job (visible in GET /v1/jobs). Responses wait on the jobs' events;
streams turn token events into OpenAI chunks. A streaming client that disconnects cancels its
jobs, so abandoned requests leave the batch.

Rendering and tokenizing run in worker threads, storing the jobs in the request's turn at the
database (api/http/limits.py). A stream starts (headers, then comment pings every `sse_ping_s`) as
soon as its jobs are stored, so a client waiting through a broker outage sees the connection
alive. A request whose wait for its jobs fails has its jobs cancelled before it is answered 503,
so that retrying it never runs them twice.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from decimal import Decimal
from typing import Annotated

import anyio
import structlog
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import ApiKeyDep, database_slots
from api.http.auth import Caller
from api.http.errors import RETRY_AFTER_S, error_body
from api.http.limits import admit
from api.http.middleware import request_id_of
from api.intake.openai_requests import (
    Choice,
    PlannedRequest,
    ResponseShape,
    build_response,
    choice_requests,
    choices_of,
    plan_request,
    plans_inline,
    submit_choices,
)
from api.results.events import (
    JUST_SUBMITTED_CHECK_S,
    STREAM_INTERRUPTED,
    StreamedEvent,
    end_relay_span,
    final_event,
    relay_span,
)
from api.results.final_events import Mark
from api.schemas.jobs import CostPublic
from api.schemas.logprobs import chat_logprobs, completion_logprobs
from api.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkFormat,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    new_response_id,
)
from api.schemas.output_formats import resolve_named_schema
from db.queries import jobs as job_queries
from db.queries import usage as usage_queries
from db.session import get_sessionmaker, session_scope
from llmq.metrics import job_finished
from llmq.price_book import get_price_book
from llmq.protocol import ErrorCategory, JobStatus

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
# With stream true the answer is a Server-Sent Events stream: each event's data is a chunk in
# JSON, and the last one's is [DONE]. (OpenAPI 3.1 has the schema describe one event.)
STREAMED: dict[int | str, dict] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        }
    }
}

# The key is stored per choice as `<key>:<index>`, which must fit the column's 200 characters.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=190,
        description="Send the same key again to get the jobs of the first request, not new ones",
    ),
]


def _submit_choices(
    request: Request,
    planned: PlannedRequest,
    caller: Caller,
    idempotency_key: str | None,
) -> list[Choice]:
    """Store the request's jobs with a session of this thread's own, closed before it returns."""
    state = request.app.state
    with get_sessionmaker(state.settings.database_url)() as session:
        admit(session, caller.owner, caller.limits, jobs=len(planned.prompts) * planned.body.n)
        choices = submit_choices(
            session,
            state,
            planned,
            owner=caller.owner,
            request_id=request_id_of(request),
            idempotency_key=idempotency_key,
        )
    _log_queued(planned, choices)
    return choices


async def _store_choices(request: Request, planned: PlannedRequest, caller: Caller) -> list[Choice]:
    """The request's jobs, stored in one transaction with those of the requests beside it
    (api/intake/store_groups.py)."""
    requests = choice_requests(planned, owner=caller.owner, request_id=request_id_of(request))
    store_groups = request.app.state.store_groups
    submissions = await store_groups.store(requests, caller.owner, caller.limits)
    choices = choices_of(planned, [submission.job for submission in submissions], new=True)
    _log_queued(planned, choices)
    return choices


def _log_queued(planned: PlannedRequest, choices: list[Choice]) -> None:
    endpoint = "chat" if planned.chat else "completions"
    log.info("openai request queued", model=planned.spec.id, jobs=len(choices), endpoint=endpoint)


def _with_named_schema(request: Request, body, caller: Caller):
    with get_sessionmaker(request.app.state.settings.database_url)() as session:
        return resolve_named_schema(session, caller.owner, body)


def _cancel_jobs(database_url: str, job_ids: list[uuid.UUID], model: str) -> int:
    with session_scope(database_url) as session:
        cancelled = sum(job_queries.cancel_job(session, job_id) for job_id in job_ids)
    job_finished(model, JobStatus.CANCELLED.value, cancelled)
    return cancelled


def _costs(database_url: str, job_ids: list[uuid.UUID]):
    with session_scope(database_url) as session:
        return usage_queries.cost_of_jobs(session, job_ids)


async def _add_cost(
    request: Request,
    choices: list[Choice],
    model: str,
    usage: UsageInfo,
    done_events: list[dict] | None = None,
):
    """Put what the request's jobs were charged (their usage rows, priced as each finished)
    into its usage, when the model has a price: as the jobs' final events tell it when they
    all do (`done_events`), else read from Postgres. Without Postgres the answer goes without."""
    if get_price_book().price(model) is None:
        return
    costs = _charged(done_events) if done_events is not None else None
    if costs is None:
        database_url = request.app.state.settings.database_url
        job_ids = [choice.job_id for choice in choices]
        try:
            costs = await anyio.to_thread.run_sync(_costs, database_url, job_ids)
        except SQLAlchemyError as exc:
            log.warning("a response's cost could not be read", error=str(exc))
            return
    if len(costs) == 1:  # a deployment charges in one currency
        [(currency, amount)] = costs.items()
        usage.cost = CostPublic.of(amount, currency)


def _charged(done_events: list[dict]) -> dict[str, Decimal] | None:
    """What jobs were charged per currency, as their final events' `ending`s tell it (sent by
    the workers that stored them, llmq/events.JobEnding); None when one does not tell it (a
    cache hit's or a follower's event, one found in a replay buffer)."""
    costs: dict[str, Decimal] = {}
    for done in done_events:
        ending = done.get("ending")
        if ending is None:
            return None
        if ending["cost"] is not None and ending["currency"] is not None:
            currency = ending["currency"]
            costs[currency] = costs.get(currency, Decimal(0)) + Decimal(ending["cost"])
    return costs


async def _final_event(request: Request, choice: Choice, since: Mark | None) -> StreamedEvent:
    if choice.finished is not None:  # answered from the cache: nothing to wait for
        return final_event(choice.job_id, choice.finished)
    return await request.app.state.event_reader.final(
        choice.job_id, since=since if choice.new else None
    )


def _choice_events(request: Request, choice: Choice):
    """A choice's events; its job was submitted by this very request."""
    reader = request.app.state.event_reader
    return reader.events(
        choice.job_id, finished=choice.finished, first_check_s=JUST_SUBMITTED_CHECK_S
    )


async def _merged_events(request: Request, choices: list[Choice]):
    """(choice, event) pairs from all the choices' streams, as they come."""
    if len(choices) == 1:  # nothing to merge: no task and queue between the reader and here
        async with aclosing(_choice_events(request, choices[0])) as events:
            async for event in events:
                yield choices[0], event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for event in _choice_events(request, choice):
            await queue.put((choice, event))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, event = await queue.get()
            remaining -= event.final
            yield choice, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_ended(request: Request, choices: list[Choice], model: str, data: dict):
    """The answer when the wait for the jobs broke off (Redis and Postgres away) while they
    may still run. They are cancelled first, so that a retry does not run them twice; if even
    that fails, the answer names them and tells OpenAI clients not to retry on their own."""
    job_ids = [choice.job_id for choice in choices]
    database_url = request.app.state.settings.database_url
    try:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_cancel_jobs, database_url, job_ids, model)
    except SQLAlchemyError as exc:
        log.warning("jobs of an interrupted request not cancelled", error=str(exc))
        ids = ", ".join(str(job_id) for job_id in job_ids)
        message = (
            f"{data['message']}; its jobs ({ids}) may still run: read them with "
            "GET /v1/jobs/{id} rather than sending the request again"
        )
        body = error_body(message, "service_unavailable", code=data["category"])
        headers = {"Retry-After": str(RETRY_AFTER_S), "x-should-retry": "false"}
        return JSONResponse(body, 503, headers=headers)
    message = (
        f"{data['message']}; its unfinished jobs were cancelled, so sending it again runs "
        "nothing twice that had not finished"
    )
    body = error_body(message, "service_unavailable", code=data["category"])
    return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})


# A remote model's upstream failures are a gateway's: 502 for an invalid answer, 503 while it
# cannot be reached. Every other failed job is a 500.
UPSTREAM_FAILURE_STATUS = {
    ErrorCategory.UPSTREAM_ERROR.value: 502,
    ErrorCategory.UPSTREAM_UNAVAILABLE.value: 503,
}


def _job_failed(event: StreamedEvent) -> JSONResponse:
    data = json.loads(event.data)
    message = f"generation failed ({data['category']}): {data['message']}"
    status = UPSTREAM_FAILURE_STATUS.get(data["category"], 500)
    return JSONResponse(error_body(message, "server_error", code=data["category"]), status)


async def _respond(
    request: Request, choices: list[Choice], model: str, build, since: Mark | None
) -> object:
    """The response once every choice's job has ended (`since`: the event reader's mark, taken
    before they were stored)."""
    events = await asyncio.gather(*(_final_event(request, c, since) for c in choices))
    usage = UsageInfo()
    finished = []
    for choice, event in zip(choices, events, strict=True):
        if event.type == "error":
            data = json.loads(event.data)
            if data["category"] == STREAM_INTERRUPTED:  # the job runs on; only the wait ended
                return await _wait_ended(request, choices, model, data)
            return _job_failed(event)
        done = json.loads(event.data)
        usage.add(done["prompt_tokens"] if choice.counts_prompt else 0, done["completion_tokens"])
        finished.append((choice.index, done))
    await _add_cost(request, choices, model, usage, [done for _, done in finished])
    return build(sorted(finished, key=lambda item: item[0]), usage)


class _StreamedLogprobs:
    """Each choice's log-probabilities, chunk by chunk: a token event carries its tokens'; the
    final event's stored list gives those no token event carried (a held-back last delta)."""

    def __init__(self, fmt: ChunkFormat, shape: ResponseShape) -> None:
        self.fmt, self.texts = fmt, shape.texts if shape.logprobs else None
        self.sent: dict[int, int] = {}  # entries sent, per choice
        self.offset: dict[int, int] = {}  # text sent, per choice (completions' text_offset)

    def of_tokens(self, index: int, data: dict) -> dict | None:
        return self._shaped(index, data.get("logprobs") or [], len(data["text"]))

    def of_done(self, index: int, data: dict) -> dict | None:
        entries = ((data.get("logprobs") or {}).get("completion") or [])[self.sent.get(index, 0) :]
        return self._shaped(index, entries, 0)

    def _shaped(self, index: int, entries: list, text_length: int) -> dict | None:
        if self.texts is None:
            return None
        first = self.sent.get(index, 0) == 0  # these tokens begin the choice's text
        self.sent[index] = self.sent.get(index, 0) + len(entries)
        offset = self.offset.get(index, 0)
        self.offset[index] = offset + text_length
        if self.fmt.chat:
            return chat_logprobs(self.texts, entries, starts_text=first)
        return completion_logprobs(self.texts, entries, offset, starts_text=first)


def _stream(
    request: Request, choices: list[Choice], fmt: ChunkFormat, shape: ResponseShape
) -> EventSourceResponse:
    settings = request.app.state.settings
    database_url = settings.database_url

    async def publish() -> AsyncIterator[bytes | ServerSentEvent]:
        completed = False
        usage = UsageInfo()
        logprobs = _StreamedLogprobs(fmt, shape)
        relay = relay_span(len(choices))
        events = 0
        try:
            if fmt.chat:
                for choice in choices:
                    yield _data(fmt.chunk(choice.index, "", None, opening=True))
            async for choice, event in _merged_events(request, choices):
                events += 1
                if events == 1 and relay is not None:
                    relay.add_event("first event")
                data = json.loads(event.data)
                if event.type == "error":
                    message = f"generation failed ({data['category']}): {data['message']}"
                    yield _data(error_body(message, "server_error", code=data["category"]))
                    completed = True
                    return
                if event.type == "token":
                    shaped = logprobs.of_tokens(choice.index, data)
                    yield _data(fmt.chunk(choice.index, data["text"], None, logprobs=shaped))
                else:
                    prompt_tokens = data["prompt_tokens"] if choice.counts_prompt else 0
                    usage.add(prompt_tokens, data["completion_tokens"])
                    shaped = logprobs.of_done(choice.index, data)
                    finish = data["finish_reason"]
                    yield _data(fmt.chunk(choice.index, "", finish, logprobs=shaped))
            if fmt.include_usage:
                await _add_cost(request, choices, fmt.model, usage)
                yield _data(fmt.usage_chunk(usage))
            yield ServerSentEvent(data="[DONE]")
            completed = True
        finally:
            if relay is not None:
                end_relay_span(relay, events, completed)
            if not completed:  # the client went away: free the batch
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        _cancel_jobs, database_url, [c.job_id for c in choices], fmt.model
                    )
                log.info("stream abandoned; jobs cancelled", jobs=len(choices))

    # Headers go out at once and pings from the start, before the first token: a job that
    # waits for a broker outage to end keeps its stream visibly alive.
    return EventSourceResponse(publish(), ping=settings.sse_ping_s)


def _data(payload: dict) -> bytes:
    """An event of one JSON payload, encoded as sse-starlette encodes it (JSON has no line
    breaks to split), without an event object and its encoder for every chunk."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\r\n\r\n"


async def _serve(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    caller: Caller,
    idempotency_key: str | None,
):
    """Plan and store the choices, then stream them or answer once all have finished."""
    state = request.app.state
    if body.named_schema() is not None:  # its content, from Postgres, before planning
        body = await anyio.to_thread.run_sync(_with_named_schema, request, body, caller)
    # Rendering and tokenizing: CPU in proportion to the prompt, off the event loop unless
    # short, and before the request takes its turn at the database.
    if plans_inline(body):
        planned = plan_request(state, body)
    else:
        planned = await anyio.to_thread.run_sync(plan_request, state, body)
    slot = await database_slots(request).acquire()
    since = state.event_reader.mark()
    try:
        if idempotency_key is None:
            choices = await _store_choices(request, planned, caller)
        else:
            choices = await anyio.to_thread.run_sync(
                _submit_choices, request, planned, caller, idempotency_key
            )
    finally:
        slot.release()
    response_id, created = new_response_id("chatcmpl" if planned.chat else "cmpl")
    shape = planned.shape(state.prompt_counter.token_texts(planned.spec))
    if planned.body.stream:
        spec, body = planned.spec, planned.body
        fmt = ChunkFormat(response_id, created, spec.id, planned.chat, body.include_usage)
        return _stream(request, choices, fmt, shape)

    def build(finished, usage):
        return build_response(shape, response_id, created, finished, usage)

    return await _respond(request, choices, planned.spec.id, build, since)


@router.post("/completions", response_model=CompletionResponse, responses=STREAMED)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    caller: ApiKeyDep,
    idempotency_key: IdempotencyKey = None,
):
    """OpenAI's text completions, on the queue."""
    return await _serve(request, body, caller, idempotency_key)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    caller: ApiKeyDep,
    idempotency_key: IdempotencyKey = None,
):
    """OpenAI's chat completions, on the queue; the prompt comes from the model's chat template."""
    return await _serve(request, body, caller, idempotency_key)
