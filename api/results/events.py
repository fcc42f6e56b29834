"""Reads a job's events for streaming: the replay buffer first, then the live channel.

The reader subscribes (api/results/job_channels.py) before it reads the buffer, so nothing
published in between is missed; ids already passed are dropped, so nothing is sent twice. When
the buffer has expired (or Redis lost it) and the job has finished, the events are rebuilt from
the row in Postgres.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from opentelemetry.trace import Span
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from api.results.final_events import FinalEventListener, Mark
from api.results.job_channels import JobChannels
from db.queries.jobs import read_job
from db.session import session_scope
from db.tables import Job
from llmq import tracing
from llmq.events import (
    DoneEvent,
    ErrorEvent,
    TokenEvent,
    events_key,
    parse_event_id,
    token_event_id,
)
from llmq.protocol import JobStatus

log = structlog.get_logger(__name__)

FINAL_TYPES = ("done", "error")
STREAM_INTERRUPTED = "stream_interrupted"
# Without Redis, a stream polls Postgres for the job's end; it gives up if Postgres is away too.
MAX_POLL_WITHOUT_REDIS_S = 2.0
DATABASE_OUTAGE_LIMIT_S = 60.0
# Postgres is the safety net for a final event Redis lost; ask it soon, then ever less often.
FIRST_IDLE_S = 0.25
MAX_IDLE_S = 8.0
# A job its caller has just submitted cannot have lost its buffer yet: the first look at
# Postgres can wait this long, and stays off the threads the submit path needs.
JUST_SUBMITTED_CHECK_S = 2.0


@dataclass(frozen=True)
class StreamedEvent:
    id: str
    type: str  # token | done | error
    data: str  # the event's JSON

    @property
    def final(self) -> bool:
        return self.type in FINAL_TYPES


@dataclass(frozen=True)
class FinishedJob:
    """What Postgres knows of a finished job, to rebuild its events."""

    status: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error_category: str | None
    error_message: str | None
    logprobs: dict | None = None


# Returns None while the job is still queued or running.
LoadFinished = Callable[[uuid.UUID], Awaitable[FinishedJob | None]]


def finished_job(job: Job | None) -> FinishedJob | None:
    """What a job's row says of its end; None while it is queued or running."""
    if job is None or not JobStatus(job.status).is_final:
        return None
    result = job.result
    return FinishedJob(
        status=job.status,
        text=result.text if result else "",
        finish_reason=result.finish_reason if result else None,
        prompt_tokens=result.prompt_tokens if result else 0,
        completion_tokens=result.completion_tokens if result else 0,
        error_category=job.error_category,
        error_message=job.error_message,
        logprobs=result.logprobs if result else None,
    )


def postgres_loader(database_url: str) -> LoadFinished:
    def load(job_id: uuid.UUID) -> FinishedJob | None:
        with session_scope(database_url) as session:
            return finished_job(read_job(session, job_id))

    async def load_async(job_id: uuid.UUID) -> FinishedJob | None:
        return await run_in_threadpool(load, job_id)

    return load_async


def rebuild_events(job_id: uuid.UUID, job: FinishedJob, after: str | None) -> list[StreamedEvent]:
    """A finished job's stream from Postgres: its whole text as one token event, then the end."""
    events = []
    if after is None and job.text:
        token = TokenEvent(
            job_id=job_id, token_index=max(job.completion_tokens - 1, 0), text=job.text
        )
        events.append(StreamedEvent("1-0", "token", token.model_dump_json()))
    events.append(final_event(job_id, job))
    return events


def final_event(job_id: uuid.UUID, job: FinishedJob) -> StreamedEvent:
    final_id = f"{int(time.time() * 1000)}-0"  # later than every token event id
    if job.error_category is not None:
        error = ErrorEvent(
            job_id=job_id, category=job.error_category, message=job.error_message or ""
        )
        return StreamedEvent(final_id, "error", error.model_dump_json())
    done = DoneEvent(
        job_id=job_id,
        status=job.status,
        finish_reason=job.finish_reason or job.status,
        text=job.text,
        prompt_tokens=job.prompt_tokens,
        completion_tokens=job.completion_tokens,
        logprobs=job.logprobs,
    )
    return StreamedEvent(final_id, "done", done.model_dump_json())


def interrupted_event(job_id: uuid.UUID, why: str) -> StreamedEvent:
    """Ends a stream that cannot go on; the job itself runs on and keeps its result."""
    error = ErrorEvent(
        job_id=job_id,
        category=STREAM_INTERRUPTED,
        message=f"{why}; the job goes on: read its result with GET /v1/jobs/{job_id}",
    )
    return StreamedEvent(f"{int(time.time() * 1000)}-0", "error", error.model_dump_json())


@dataclass
class StreamProgress:
    """What a stream has sent so far, to go on from Postgres if Redis is lost mid-stream."""

    last_id: str | None
    text: str = ""

    def record(self, event: StreamedEvent) -> None:
        self.last_id = event.id
        if event.type == "token":
            self.text += json.loads(event.data)["text"]

    def next_token_id(self) -> str:
        number = parse_event_id(self.last_id)[0] if self.last_id else 0
        return token_event_id(number + 1)


class JobEventReader:
    def __init__(
        self,
        redis: aioredis.Redis,
        load_finished: LoadFinished,
        finals: FinalEventListener,
        channels: JobChannels,
        idle_s: float = 1.0,
    ):
        self.redis = redis
        self.load_finished = load_finished
        self.finals = finals
        self.channels = channels
        self.idle_s = idle_s

    async def events(
        self,
        job_id: uuid.UUID,
        after: str | None = None,
        finished: FinishedJob | None = None,
        first_check_s: float = FIRST_IDLE_S,
    ) -> AsyncIterator[StreamedEvent]:
        """Every event of the job after `after` (a Last-Event-ID), in order, each once.

        `finished` is the job's end when the caller has just read it from Postgres: a finished
        job with nothing in Redis (a cache hit, an expired buffer) is then rebuilt at once.
        Postgres is first asked after `first_check_s` without an event (JUST_SUBMITTED_CHECK_S
        for a job the caller has just submitted).
        If Redis goes away mid-stream, the stream waits for the job's row in Postgres and sends
        the rest of the text and the final event from there, or ends with an error event when
        that cannot continue the text already sent."""
        progress = StreamProgress(after)
        try:
            async for event in self._live_events(job_id, after, finished, first_check_s):
                progress.record(event)
                yield event
            return
        except RedisError as exc:
            log.warning("event store lost mid-stream", job_id=str(job_id), error=str(exc))
        async for event in self._finish_from_postgres(job_id, progress):
            yield event

    async def _finish_from_postgres(
        self, job_id: uuid.UUID, progress: StreamProgress
    ) -> AsyncIterator[StreamedEvent]:
        finished = await self._wait_finished(job_id)
        if finished is None:
            yield interrupted_event(job_id, "the event store and the job database are away")
        elif finished.text.startswith(progress.text):
            if remainder := finished.text[len(progress.text) :]:
                index = max(finished.completion_tokens - 1, 0)
                token = TokenEvent(job_id=job_id, token_index=index, text=remainder)
                yield StreamedEvent(progress.next_token_id(), "token", token.model_dump_json())
            yield final_event(job_id, finished)
        else:  # the job ran again elsewhere and sampled another text
            yield interrupted_event(job_id, "the event store lost this stream")

    async def _wait_finished(self, job_id: uuid.UUID) -> FinishedJob | None:
        """The job's row once it has finished; None if Postgres stays away too long."""
        loop = asyncio.get_running_loop()
        idle_s, unreachable_since = FIRST_IDLE_S, None
        while True:
            try:
                finished = await self.load_finished(job_id)
                unreachable_since = None
            except Exception as exc:
                log.warning("job database unreachable", job_id=str(job_id), error=str(exc))
                finished, unreachable_since = None, unreachable_since or loop.time()
                if loop.time() - unreachable_since > DATABASE_OUTAGE_LIMIT_S:
                    return None
            if finished is not None:
                return finished
            await asyncio.sleep(idle_s)
            idle_s = min(idle_s * 2, MAX_POLL_WITHOUT_REDIS_S)

    async def _live_events(
        self,
        job_id: uuid.UUID,
        after: str | None,
        finished: FinishedJob | None,
        first_check_s: float,
    ) -> AsyncIterator[StreamedEvent]:
        key = events_key(job_id)
        last = parse_event_id(after) if after else (0, 0)
        subscription = await self.channels.subscribe(key)
        try:
            async for event in self._replay(key, after):
                last = parse_event_id(event.id)
                yield event
                if event.final:
                    return
            if finished is not None and not await self.redis.exists(key):
                for event in rebuild_events(job_id, finished, after):
                    yield event
                return
            # Postgres is asked only when the feed is quiet: soon after connecting (the job may
            # have finished long ago, its buffer gone), then with a growing interval.
            idle_s = first_check_s
            waited_for_final = False
            while True:
                message = await subscription.next(idle_s)
                if message is None:
                    idle_s = min(max(idle_s * 2, self.idle_s), MAX_IDLE_S)
                    finished = await self.load_finished(job_id)
                    if finished is None:
                        continue
                    since = f"{last[0]}-{last[1]}" if last != (0, 0) else None
                    async for event in self._replay(key, since):
                        last = parse_event_id(event.id)
                        yield event
                        if event.final:
                            return
                    if await self.redis.exists(key) and not waited_for_final:
                        waited_for_final = True  # it follows the row's commit; give it a round
                        continue
                    since = f"{last[0]}-{last[1]}" if last != (0, 0) else None
                    for event in rebuild_events(job_id, finished, since):
                        yield event
                    return
                event_id, kind, data = message.decode().split(" ", 2)
                if parse_event_id(event_id) <= last:
                    continue
                event = StreamedEvent(event_id, kind, data)
                last = parse_event_id(event.id)
                yield event
                if event.final:
                    return
        finally:
            subscription.close()

    def mark(self) -> Mark | None:
        """Take before submitting jobs to wait for, and pass to `final` or `wait_final` as
        `since` for the jobs the submission created: their final events cannot have been
        published before it, and while the final-event subscription stands from the mark to the
        wait, their replay buffers need no look."""
        return self.finals.mark()

    async def final(
        self,
        job_id: uuid.UUID,
        first_check_s: float = JUST_SUBMITTED_CHECK_S,
        since: Mark | None = None,
    ) -> StreamedEvent:
        """Only the job's final event, without reading its tokens (for non-streamed responses,
        whose callers have just submitted the job). Without Redis, the final event is read from
        the job's row once it has finished."""
        try:
            return await self._final_from_redis(job_id, first_check_s, since)
        except RedisError as exc:
            log.warning("event store lost while waiting", job_id=str(job_id), error=str(exc))
        finished = await self._wait_finished(job_id)
        if finished is None:
            return interrupted_event(job_id, "the event store and the job database are away")
        return final_event(job_id, finished)

    async def wait_final(
        self, job_id: uuid.UUID, timeout_s: float, since: Mark | None = None
    ) -> StreamedEvent | None:
        """Return once the job has ended, or after `timeout_s` (long polling). Its final event
        is the signal; Postgres is asked each second in case the event was lost, and each
        quarter second while Redis is away. Returns the final event as its final channel
        brought it (with the job's `ending` when the worker that stored it sent one), or None
        when the end was seen elsewhere or not at all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        published = self.finals.watch(job_id)
        try:
            try:
                if self.finals.may_have_missed(job_id, since):
                    newest = await self._newest_event(events_key(job_id))
                    if newest is not None and newest.final:
                        return None
            except RedisError:
                pass
            while (remaining := deadline - loop.time()) > 0:
                slice_s = min(remaining, 1.0 if self.finals.listening else FIRST_IDLE_S)
                try:
                    message = await asyncio.wait_for(asyncio.shield(published), slice_s)
                    return _live_final(message)
                except TimeoutError:
                    if await self.load_finished(job_id) is not None:
                        return None
            return None
        finally:
            self.finals.unwatch(job_id, published)

    async def _final_from_redis(
        self, job_id: uuid.UUID, first_check_s: float, since: Mark | None
    ) -> StreamedEvent:
        if not self.finals.listening:
            raise RedisError("the final-event listener is not subscribed")
        key = events_key(job_id)
        published = self.finals.watch(job_id)
        try:
            idle_s = first_check_s
            look = self.finals.may_have_missed(job_id, since)
            newest = None
            while True:
                if look:
                    newest = await self._newest_event(key)
                    if newest is not None and newest.final:
                        return newest
                look = True  # after a quiet while, the event may have been lost on its way
                try:
                    message = await asyncio.wait_for(asyncio.shield(published), idle_s)
                except TimeoutError:
                    if not self.finals.listening:  # published meanwhile may have been missed
                        raise RedisError("the final-event listener lost Redis") from None
                else:
                    return _live_final(message)
                idle_s = min(max(idle_s * 2, self.idle_s), MAX_IDLE_S)
                finished = await self.load_finished(job_id)
                if finished is not None and newest is None:  # finished, its buffer gone
                    return final_event(job_id, finished)
        finally:
            self.finals.unwatch(job_id, published)

    async def _newest_event(self, key: str) -> StreamedEvent | None:
        """The newest event of a job's replay buffer; None when the buffer is empty or gone."""
        newest = await self.redis.xrevrange(key, count=1)
        if not newest:
            return None
        event_id, fields = newest[0]
        return StreamedEvent(event_id.decode(), fields[b"type"].decode(), fields[b"data"].decode())

    async def _replay(self, key: str, after: str | None) -> AsyncIterator[StreamedEvent]:
        start = f"({after}" if after else "-"
        entries = await self.redis.xrange(key, min=start)
        if not entries and after is None:
            return
        for event_id, fields in entries:
            yield StreamedEvent(
                event_id.decode(), fields[b"type"].decode(), fields[b"data"].decode()
            )


def _live_final(message: str) -> StreamedEvent:
    """A final event as the final channel brought it (publisher.live_message)."""
    event_id, kind, data = message.split(" ", 2)
    return StreamedEvent(event_id, kind, data)


def relay_span(jobs: int, job_traces: Sequence[str | None] = ()) -> Span | None:
    """A span for relaying jobs' events to one client's stream, under the request's span and
    linked to the jobs' own traces where they began in other requests (`job_traces`, their
    rows' trace contexts); None with tracing off. Started, not made current: the relay is an
    async generator that the server resumes in contexts of its own."""
    if not tracing.request_traced():
        return None
    links = [link for context in job_traces for link in tracing.link_to(context)]
    span = tracing.tracer().start_span("llmq.stream.relay", links=links)
    span.set_attribute("llmq.jobs", jobs)
    return span


def end_relay_span(span: Span, events: int, completed: bool) -> None:
    span.set_attribute("llmq.events", events)
    span.set_attribute("llmq.completed", completed)
    span.end()
