"""OpenAI-compatible completions and chat completions, each choice a job on the queue.

Every choice is an ordinary job (visible in GET /v1/jobs). Responses wait on the jobs' events;
streams turn token events into OpenAI chunks. A streaming client that disconnects cancels its
jobs, so abandoned requests leave the batch.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import anyio
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import Caller
from api.deps import ApiKeyDep
from api.errors import RETRY_AFTER_S, error_body
from api.events import STREAM_INTERRUPTED, StreamedEvent, final_event
from api.limits import admit
from api.middleware import request_id_of
from api.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkFormat,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    new_response_id,
)
from api.openai_requests import (
    Choice,
    PlannedRequest,
    build_response,
    plan_request,
    submit_choices,
)
from db.queries import jobs as job_queries
from db.session import get_sessionmaker, session_scope
from llmq.metrics import job_finished
from llmq.protocol import JobStatus

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

PING_S = 15


def _submit_choices(
    request: Request, planned: PlannedRequest, source: dict, caller: Caller
) -> list[Choice]:
    state = request.app.state
    with get_sessionmaker(state.settings.database_url)() as session:
        admit(session, caller.owner, caller.limits, jobs=len(planned.prompts) * planned.body.n)
        choices = submit_choices(
            session, state, planned, owner=caller.owner, request_id=request_id_of(request)
        )
    log.info("openai request queued", model=planned.spec.id, jobs=len(choices), **source)
    return choices


def _cancel_jobs(database_url: str, job_ids: list[uuid.UUID], model: str) -> None:
    with session_scope(database_url) as session:
        cancelled = sum(job_queries.cancel_job(session, job_id) for job_id in job_ids)
    job_finished(model, JobStatus.CANCELLED.value, cancelled)


async def _final_event(request: Request, choice: Choice) -> StreamedEvent:
    if choice.finished is not None:  # answered from the cache: nothing to wait for
        return final_event(choice.job_id, choice.finished)
    return await request.app.state.event_reader.final(choice.job_id)


async def _merged_events(request: Request, choices: list[Choice]):
    """(choice, event) pairs from all the choices' streams, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        reader = request.app.state.event_reader
        async for event in reader.events(choice.job_id, finished=choice.finished):
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


def _job_failed(event: StreamedEvent) -> JSONResponse:
    data = json.loads(event.data)
    if data["category"] == STREAM_INTERRUPTED:  # the job runs on; only this wait ended
        body = error_body(data["message"], "service_unavailable", code=data["category"])
        return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    message = f"generation failed ({data['category']}): {data['message']}"
    return JSONResponse(error_body(message, "server_error", code=data["category"]), 500)


async def _respond(request: Request, choices: list[Choice], build) -> object:
    events = await asyncio.gather(*(_final_event(request, c) for c in choices))
    usage = UsageInfo()
    finished = []
    for choice, event in zip(choices, events, strict=True):
        if event.type == "error":
            return _job_failed(event)
        done = json.loads(event.data)
        usage.add(done["prompt_tokens"] if choice.counts_prompt else 0, done["completion_tokens"])
        finished.append((choice.index, done))
    return build(sorted(finished, key=lambda item: item[0]), usage)


def _stream(request: Request, choices: list[Choice], fmt: ChunkFormat) -> EventSourceResponse:
    database_url = request.app.state.settings.database_url

    async def publish() -> AsyncIterator[ServerSentEvent]:
        completed = False
        usage = UsageInfo()
        try:
            if fmt.chat:
                for choice in choices:
                    yield _data(fmt.chunk(choice.index, "", None, opening=True))
            async for choice, event in _merged_events(request, choices):
                data = json.loads(event.data)
                if event.type == "error":
                    message = f"generation failed ({data['category']}): {data['message']}"
                    yield _data(error_body(message, "server_error", code=data["category"]))
                    completed = True
                    return
                if event.type == "token":
                    yield _data(fmt.chunk(choice.index, data["text"], None))
                else:
                    prompt_tokens = data["prompt_tokens"] if choice.counts_prompt else 0
                    usage.add(prompt_tokens, data["completion_tokens"])
                    yield _data(fmt.chunk(choice.index, "", data["finish_reason"]))
            if fmt.include_usage:
                yield _data(fmt.usage_chunk(usage))
            yield ServerSentEvent(data="[DONE]")
            completed = True
        finally:
            if not completed:  # the client went away: free the batch
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        _cancel_jobs, database_url, [c.job_id for c in choices], fmt.model
                    )
                log.info("stream abandoned; jobs cancelled", jobs=len(choices))

    return EventSourceResponse(publish(), ping=PING_S)


def _data(payload: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, separators=(",", ":")))


async def _serve(request: Request, planned: PlannedRequest, caller: Caller):
    """Queue the choices, then stream them or answer once all have finished."""
    source = {"endpoint": "chat" if planned.chat else "completions"}
    choices = await anyio.to_thread.run_sync(_submit_choices, request, planned, source, caller)
    response_id, created = new_response_id("chatcmpl" if planned.chat else "cmpl")
    if planned.body.stream:
        spec, body = planned.spec, planned.body
        fmt = ChunkFormat(response_id, created, spec.id, planned.chat, body.include_usage)
        return _stream(request, choices, fmt)

    def build(finished, usage):
        return build_response(planned.chat, planned.spec.id, response_id, created, finished, usage)

    return await _respond(request, choices, build)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request, caller: ApiKeyDep):
    """OpenAI's text completions, on the queue."""
    return await _serve(request, plan_request(request.app.state, body), caller)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, caller: ApiKeyDep):
    """OpenAI's chat completions, on the queue; the prompt comes from the model's chat template."""
    return await _serve(request, plan_request(request.app.state, body), caller)
