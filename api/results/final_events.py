"""Every job's final event reaches this API process through one pattern subscription.

A non-streamed response waits for its jobs' final events only. A subscription of its own cost
each request a Redis connection and three commands; one listener per process hands each final
event to whoever waits for that job, and costs a request nothing but a dictionary entry.
Every process receives every final event, which for a handful of API processes is cheaper
than a subscription per request.

A request that waits for jobs it has just submitted need not look in their replay buffers for a
final event published before it began to watch: a `Mark` taken before the jobs could be sent
says whether the subscription has stood ever since (`may_have_missed`). The listener remembers
which jobs' final events came while nobody watched them, by id only: the newest UNWATCHED_KEPT
of them. A mark is spent once the subscription broke, or once an id remembered after it was
forgotten.
"""

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from llmq.events import FINAL_PREFIX

log = structlog.get_logger(__name__)

RECONNECT_S = 0.5
# Final events of jobs nobody watched, remembered by id: enough for the moments between a job's
# send and its submitter's watch, at thousands of jobs a second across all API processes.
UNWATCHED_KEPT = 4096


@dataclass(frozen=True)
class Mark:
    """The listener at one moment: which subscription stood, how many unwatched ids it had
    remembered until then."""

    subscription: int
    remembered: int


class FinalEventListener:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._waiters: dict[str, list[asyncio.Future[str]]] = defaultdict(list)
        self._listening = asyncio.Event()  # set while the subscription stands
        self._task: asyncio.Task | None = None
        self._subscriptions = 0  # subscriptions made so far: a new one may have missed events
        # Job ids whose final event came unwatched, oldest first (a dict keeps insertion order),
        # and how many ever came: those not kept any more were forgotten, oldest first.
        self._unwatched: dict[str, None] = {}
        self._remembered = 0

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

    def watching(self, job_id: uuid.UUID) -> bool:
        """Whether a request waits for the job's final event here."""
        return str(job_id) in self._waiters

    def mark(self) -> Mark | None:
        """Take before jobs are sent (None while not subscribed), for `may_have_missed`."""
        if not self.listening:
            return None
        return Mark(self._subscriptions, self._remembered)

    def may_have_missed(self, job_id: uuid.UUID, since: Mark | None) -> bool:
        """Whether the job's final event may have been published before `watch(job_id)` (call
        it after the watch) without reaching the watcher: False only when the subscription has
        stood since the mark, which was taken before the job could be sent, and no event of the
        job came unwatched. Either way a final event published later reaches the watcher."""
        if since is None or not self.listening or since.subscription != self._subscriptions:
            return True
        forgotten = self._remembered - len(self._unwatched)
        if forgotten > since.remembered:  # more than all it had: ids that came after it are gone
            return True
        return str(job_id) in self._unwatched

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
                self._subscriptions += 1
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
        waiters = self._waiters.pop(job_id, None)
        if not waiters:
            self._remember_unwatched(job_id)
            return
        for future in waiters:
            if not future.done():
                future.set_result(message["data"].decode())

    def _remember_unwatched(self, job_id: str) -> None:
        # An id that came twice counts as one forgotten: marks are spent a little early, never late.
        self._unwatched[job_id] = None
        self._remembered += 1
        if len(self._unwatched) > UNWATCHED_KEPT:
            del self._unwatched[next(iter(self._unwatched))]


async def _close(pubsub) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, OSError):
        pass
