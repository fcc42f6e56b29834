"""Publishes job events to Redis: the replay stream and the live channel of each job.

Workers publish token deltas and final events; the API publishes the final event of a job
cancelled before it ran. Events go through one queue to one sender thread, so the decode loop
never waits on Redis, every event of a job keeps its order (a job's final event always follows
its tokens), and events that pile up while Redis answers go out together in one round trip.

A job's replay buffer gets its time to live with its first event from this publisher, again
with a token event once half of it has passed, and with its final event: not with every token
event, where it would be a third of the commands each costs Redis and the sender. (A buffer
deleted while its job streams, by hand or by a Redis restart, has none until its final event.)
"""

import queue
import threading
import time
import uuid
from dataclasses import dataclass

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from llmq.events import (
    REPLAY_MAXLEN,
    REPLAY_TTL_S,
    DoneEvent,
    JobEvent,
    TokenEvent,
    events_key,
    final_channel,
    token_event_id,
)

log = structlog.get_logger(__name__)

MAX_ITEMS_PER_ROUND_TRIP = 256
REFRESH_TTL_S = REPLAY_TTL_S / 2
# Jobs whose time to live this publisher tracks; past this many, the longest tracked is forgotten
# (a job whose final event another process published is never told here), which costs it no
# more than one more EXPIRE.
MAX_TRACKED_JOBS = 10_000


@dataclass(frozen=True)
class TokenEmission:
    """The n-th text delta of a job (n counts from 1)."""

    number: int
    event: TokenEvent


@dataclass(frozen=True)
class _Final:
    job_id: uuid.UUID
    event: JobEvent


@dataclass(frozen=True)
class _Reset:
    job_id: uuid.UUID


def live_message(event_id: str, event_type: str, data: str) -> str:
    """What goes on the pub/sub channel: stream id, event type and the event JSON, spaced, so a
    reader can route an event without parsing its JSON."""
    return f"{event_id} {event_type} {data}"


def final_event_id() -> str:
    """A millisecond timestamp: later than every token event id (`<n>-0`) of the job."""
    return f"{time.time_ns() // 1_000_000}-0"


class TokenPublisher:
    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._queue: queue.Queue = queue.Queue()
        # When each job's buffer last had its time to live set (time.monotonic(); the sender
        # thread's own).
        self._expires_set: dict[uuid.UUID, float] = {}
        self._thread = threading.Thread(target=self._run, name="llmq-publisher", daemon=True)
        self._thread.start()

    def publish_tokens(self, emissions: list[TokenEmission]) -> None:
        """One decode step's deltas. Streaming is best effort: results are stored in Postgres
        whatever happens to Redis."""
        if emissions:
            self._queue.put(emissions)

    def publish_final(self, job_id: uuid.UUID, event: JobEvent) -> None:
        self._queue.put(_Final(job_id, event))

    def reset(self, job_id: uuid.UUID) -> None:
        """Forget a job's events before it runs again after a lost worker."""
        self._queue.put(_Reset(job_id))

    def flush(self) -> None:
        """Wait until everything handed over so far has been sent (or given up on)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < MAX_ITEMS_PER_ROUND_TRIP:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send([item for item in items if item is not None])
            finally:
                for _ in items:
                    self._queue.task_done()
            if None in items:
                return

    def _send(self, items: list) -> None:
        pipe = self.redis.pipeline(transaction=False)
        now = time.monotonic()
        for item in items:
            if isinstance(item, _Reset):
                self._expires_set.pop(item.job_id, None)
                pipe.delete(events_key(item.job_id))
            elif isinstance(item, _Final):
                self._expires_set.pop(item.job_id, None)
                event_id, data = final_event_id(), item.event.model_dump_json()
                streamed = data  # a done event's `ending` is for the final channel only
                if isinstance(item.event, DoneEvent) and item.event.ending is not None:
                    streamed = item.event.model_dump_json(exclude={"ending"})
                self._add(pipe, item.job_id, event_id, item.event.type, streamed, expire=True)
                # For waiters that need no tokens (non-streamed responses).
                channel = final_channel(item.job_id)
                pipe.publish(channel, live_message(event_id, item.event.type, data))
            else:
                for emission in item:
                    job_id = emission.event.job_id
                    self._add(
                        pipe,
                        job_id,
                        token_event_id(emission.number),
                        "token",
                        emission.event.model_dump_json(),
                        expire=self._expire_due(job_id, now),
                    )
        try:
            pipe.execute(raise_on_error=False)
        except RedisError as exc:
            self._expires_set.clear()  # whether they were set is unknown: set them again
            log.warning("event publish failed", error=str(exc), items=len(items))

    def _expire_due(self, job_id: uuid.UUID, now: float) -> bool:
        """Whether the job's buffer should have its time to live set with this event."""
        last = self._expires_set.get(job_id)
        if last is not None and now - last < REFRESH_TTL_S:
            return False
        # Oldest first (insertion order), so forgetting one costs the same however many are kept.
        self._expires_set.pop(job_id, None)
        self._expires_set[job_id] = now
        if len(self._expires_set) > MAX_TRACKED_JOBS:
            del self._expires_set[next(iter(self._expires_set))]
        return True

    @staticmethod
    def _add(
        pipe: Pipeline, job_id: uuid.UUID, event_id: str, kind: str, data: str, expire: bool
    ) -> None:
        key = events_key(job_id)
        fields = {"type": kind, "data": data}
        pipe.xadd(key, fields, id=event_id, maxlen=REPLAY_MAXLEN, approximate=True)
        if expire:
            pipe.expire(key, REPLAY_TTL_S)
        pipe.publish(key, live_message(event_id, kind, data))
