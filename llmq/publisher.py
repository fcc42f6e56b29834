"""Publishes job events to Redis: the replay stream and the live channel of each job.

Workers publish token deltas (one round trip per decode step) and final events; the API
publishes the final event of a job cancelled before it ran.
"""

import uuid
from dataclasses import dataclass

import structlog
from redis import Redis
from redis.exceptions import RedisError

from llmq.events import (
    REPLAY_MAXLEN,
    REPLAY_TTL_S,
    JobEvent,
    TokenEvent,
    events_key,
    token_event_id,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TokenEmission:
    """The n-th text delta of a job (n counts from 1)."""

    number: int
    event: TokenEvent


def live_message(event_id: str, event_type: str, data: str) -> str:
    """What goes on the pub/sub channel: stream id, event type and the event JSON, spaced, so a
    reader can route an event without parsing its JSON."""
    return f"{event_id} {event_type} {data}"


class TokenPublisher:
    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)

    def publish_tokens(self, emissions: list[TokenEmission]) -> None:
        """All of one decode step's deltas in one round trip. Streaming is best effort: a Redis
        failure is logged and generation goes on (results are stored in Postgres regardless)."""
        if not emissions:
            return
        pipe = self.redis.pipeline(transaction=False)
        for emission in emissions:
            key = events_key(emission.event.job_id)
            event_id = token_event_id(emission.number)
            data = emission.event.model_dump_json()
            fields = {"type": "token", "data": data}
            pipe.xadd(key, fields, id=event_id, maxlen=REPLAY_MAXLEN, approximate=True)
            pipe.expire(key, REPLAY_TTL_S)
            pipe.publish(key, live_message(event_id, "token", data))
        try:
            pipe.execute(raise_on_error=False)
        except RedisError as exc:
            log.warning("token publish failed", error=str(exc), events=len(emissions))

    def publish_final(self, job_id: uuid.UUID, event: JobEvent) -> None:
        key = events_key(job_id)
        data = event.model_dump_json()
        fields = {"type": event.type, "data": data}
        try:
            event_id = self.redis.xadd(key, fields, maxlen=REPLAY_MAXLEN, approximate=True)
            pipe = self.redis.pipeline(transaction=False)
            pipe.expire(key, REPLAY_TTL_S)
            pipe.publish(key, live_message(event_id.decode(), event.type, data))
            pipe.execute()
        except RedisError as exc:
            log.warning("final event publish failed", job_id=str(job_id), error=str(exc))

    def reset(self, job_id: uuid.UUID) -> None:
        """Forget a job's events before it runs again after a lost worker."""
        try:
            self.redis.delete(events_key(job_id))
        except RedisError as exc:
            log.warning("event reset failed", job_id=str(job_id), error=str(exc))
