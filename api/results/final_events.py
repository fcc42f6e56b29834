"""Every job's final event reaches this API process through one pattern subscription.

A non-streamed response waits for its jobs' final events only. A subscription of its own cost
each request a Redis connection and three commands; one listener per process hands each final
event to whoever waits for that job, and costs a request nothing but a dictionary entry.
Every process receives every final event, which for a handful of API processes is cheaper
than a subscription per request.
"""

import asyncio
import uuid
from collections import defaultdict

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from llmq.events import FINAL_PREFIX

log = structlog.get_logger(__name__)

RECONNECT_S = 0.5


class FinalEventListener:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._waiters: dict[str, list[asyncio.Future[str]]] = defaultdict(list)
        self._listening = asyncio.Event()  # set while the subscription stands
        self._task: asyncio.Task | None = None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmq-finals")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_listening(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._listening.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def watch(self, job_id: uuid.UUID) -> asyncio.Future[str]:
        """A future for the job's final event as published (`live_message`). Watch before
        looking for an event already published, so that none falls between the two."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[str(job_id)].append(future)
        return future

    def unwatch(self, job_id: uuid.UUID, future: asyncio.Future[str]) -> None:
        waiters = self._waiters.get(str(job_id))
        if waiters is None:
            return
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            del self._waiters[str(job_id)]

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(f"{FINAL_PREFIX}*")
                self._listening.set()
                async for message in pubsub.listen():
                    self._deliver(message)
            except RedisError as exc:
                if self._listening.is_set():
                    log.warning("final-event listener lost Redis; reconnecting", error=str(exc))
            finally:
                self._listening.clear()
                await _close(pubsub)
            await asyncio.sleep(RECONNECT_S)

    def _deliver(self, message: dict) -> None:
        if message.get("type") != "pmessage":
            return
        job_id = message["channel"].decode().removeprefix(FINAL_PREFIX)
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(message["data"].decode())


async def _close(pubsub) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, OSError):
        pass
