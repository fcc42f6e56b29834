"""Server-Sent Events: a job's tokens as they are generated."""

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import WithJsonSchema
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import ApiKeyDep, SessionDep
from api.results.events import end_relay_span, finished_job, relay_span
from db.queries import jobs as job_queries
from llmq.errors import InvalidRequest, JobNotFound

router = APIRouter(prefix="/v1/jobs", tags=["streams"])

# Redis stream ids, as the events carry them: "12-0", or "12" for "12-0". Digits are capped so
# that each part fits the 64 bits Redis reads.
EVENT_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")


def check_event_id(value: str | None) -> str | None:
    """The Last-Event-ID header, checked here rather than by its schema for a message that
    says what to send."""
    if value is None:
        return None
    if not EVENT_ID.fullmatch(value):
        raise InvalidRequest(
            f"Last-Event-ID {value!r} is not an event id of this API; send back the id of the "
            "last event you received, such as 12-0",
            param="Last-Event-ID",
        )
    return value


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_job_events(
    job_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    caller: ApiKeyDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID"),
        # Published as check_event_id reads it. Not nullable: a header is text or absent.
        WithJsonSchema({"type": "string", "pattern": f"^{EVENT_ID.pattern}$"}),
    ] = None,
) -> EventSourceResponse:
    """Stream a job: `token` events with text deltas, then one `done` or `error` event.

    Reconnect with the `Last-Event-ID` header to resume after the last event received. The job
    keeps running when the client goes away; its result is stored either way.
    """
    after = check_event_id(last_event_id)
    job = await run_in_threadpool(job_queries.get_job, session, job_id)
    if job is None or not caller.can_see(job.owner):  # another key's job does not exist here
        raise JobNotFound(job_id)
    finished = finished_job(job)  # a job that has finished is not waited for
    trace_context = job.trace_context  # the job's own trace, begun by its submission
    session.close()  # the stream may be long; give the connection back now
    reader = request.app.state.event_reader

    async def publish():
        relay = relay_span(1, [trace_context])
        events, completed = 0, False
        try:
            async for event in reader.events(job_id, after, finished):
                events += 1
                yield ServerSentEvent(data=event.data, event=event.type, id=event.id)
            completed = True
        finally:
            if relay is not None:
                end_relay_span(relay, events, completed)

    return EventSourceResponse(publish(), ping=request.app.state.settings.sse_ping_s)
