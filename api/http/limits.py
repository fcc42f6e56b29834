"""Per-key limits: requests per minute, counted in Redis; jobs queued or running at once,
tokens per calendar month, and spend per calendar month (in the deployment's currency, see
llmq/pricing.py), read from Postgres. Their state lives in Redis and Postgres, so the
limits hold however many API processes serve a key. And the process's own: how many requests
use Postgres at once (DatabaseSlots).

A spent monthly quota or spend limit is refused with 429 and type `insufficient_quota`, as
OpenAI does, with `x-should-retry: false` so that OpenAI's clients do not retry until the month
ends. Concurrent jobs are counted before new ones are stored: requests that arrive together
can overshoot the limit by the number of them, never by more (and a month's spend by what jobs
in flight cost when they finish).
"""

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import anyio
import redis.asyncio as aioredis
import structlog
from anyio.lowlevel import RunVar
from redis.exceptions import RedisError
from sqlalchemy.orm import Session
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.queries import usage as usage_queries
from db.tables import ApiKey
from llmq.errors import QuotaExceeded, ServerBusy, SpendLimitReached, TooManyConcurrentJobs
from llmq.price_book import get_price_book
from llmq.pricing import format_amount
from llmq.settings import Settings

log = structlog.get_logger(__name__)

WINDOW_S = 60
# How long to stop counting after Redis failed: requests pass unlimited rather than each wait
# out a timeout, and the queue itself needs Redis anyway.
REST_AFTER_FAILURE_S = 5.0
REDIS_TIMEOUT_S = 0.5
STATE_KEY = "rate_limit"  # where the request's Window waits for RateLimitHeaders


@dataclass(frozen=True)
class KeyLimits:
    """A key's limits in force: its own, or the settings' defaults; 0 means no limit."""

    rate_limit_per_minute: int = 0
    max_concurrent_jobs: int = 0
    monthly_token_quota: int = 0
    monthly_spend_limit: Decimal = Decimal(0)  # the key's own only: there is no default


@dataclass(frozen=True)
class Window:
    """One key's count in the current minute."""

    limit: int
    count: int
    reset_s: int  # until the window ends

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.count)),
            "X-RateLimit-Reset": str(self.reset_s),
        }


class RateLimiter:
    """Fixed one-minute windows per key in Redis: `SET NX EX` then `INCR`, pipelined, which is
    one round trip per request. The expiry cleans old windows up."""

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._resting_until = 0.0

    async def hit(self, key_id: uuid.UUID, limit: int) -> Window | None:
        """Count a request; None when Redis cannot count it (then it is not limited)."""
        now = time.time()
        if now < self._resting_until:
            return None
        window = int(now // WINDOW_S)
        name = f"llmq:ratelimit:{key_id}:{window}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(name, 0, ex=2 * WINDOW_S, nx=True)
                pipe.incr(name)
                _, count = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._resting_until = now + REST_AFTER_FAILURE_S
            log.warning("rate limits not counted: Redis unavailable", error=str(exc))
            return None
        return Window(limit, count, math.ceil((window + 1) * WINDOW_S - now))

    async def close(self) -> None:
        await self._redis.aclose()


def limits_of(row: ApiKey, settings: Settings) -> KeyLimits:
    """The key's own limits where it sets them, the settings' defaults where not."""

    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return KeyLimits(
        rate_limit_per_minute=pick(row.rate_limit_per_minute, settings.rate_limit_per_minute),
        max_concurrent_jobs=pick(row.max_concurrent_jobs, settings.max_concurrent_jobs),
        monthly_token_quota=pick(row.monthly_token_quota, settings.monthly_token_quota),
        monthly_spend_limit=row.monthly_spend_limit or Decimal(0),
    )


def _load(
    session: Session, owner: str | None, limits: KeyLimits, count_jobs: bool
) -> usage_queries.Load | None:
    """The key's jobs in flight (when counted) after QuotaExceeded (429) if it has spent its
    monthly tokens or reached its monthly spend limit; None when there is nothing to check."""
    # No model with a price: nothing is spent, so a spend limit has nothing to count.
    currency = get_price_book().currency if limits.monthly_spend_limit else None
    monthly = bool(limits.monthly_token_quota or currency)
    if owner is None or not (count_jobs or monthly):
        return None  # with auth off no one owns anything, and nothing is limited
    now = datetime.now(UTC)
    since = usage_queries.month_start(now) if monthly else None
    load = usage_queries.load(
        session, owner, count_jobs=count_jobs, since=since, spend_currency=currency
    )
    renews_in_s = math.ceil((usage_queries.next_month_start(now) - now).total_seconds())
    if limits.monthly_token_quota and load.tokens_this_month >= limits.monthly_token_quota:
        raise QuotaExceeded(
            load.tokens_this_month,
            limits.monthly_token_quota,
            now.strftime("%B %Y"),
            renews_in_s,
        )
    if currency is not None and load.spent_this_month >= limits.monthly_spend_limit:
        raise SpendLimitReached(
            format_amount(load.spent_this_month),
            format_amount(limits.monthly_spend_limit),
            currency,
            now.strftime("%B %Y"),
            renews_in_s,
        )
    return load


def job_room(session: Session, owner: str | None, limits: KeyLimits) -> int | None:
    """How many more jobs the key may have queued or running now (None: no limit), after
    QuotaExceeded (429) if it has spent its monthly tokens or reached its spend limit."""
    count_jobs = bool(limits.max_concurrent_jobs)
    load = _load(session, owner, limits, count_jobs)
    if load is None or not count_jobs:
        return None
    return max(0, limits.max_concurrent_jobs - load.jobs_in_flight)


def admit(
    session: Session, owner: str | None, limits: KeyLimits, jobs: int, not_yet_stored: int = 0
) -> None:
    """Refuse new work (429) once the key has spent its monthly tokens or reached its monthly
    spend limit, or when `jobs` more would take it past its jobs queued or running at once.
    `jobs=0` checks the quota and spend limit only. `not_yet_stored`: the key's jobs admitted
    in this transaction but not inserted yet (store_groups.py), in flight all the same."""
    count_jobs = bool(limits.max_concurrent_jobs) and jobs > 0
    load = _load(session, owner, limits, count_jobs)
    if load is not None and count_jobs:
        in_flight = load.jobs_in_flight + not_yet_stored
        if in_flight + jobs > limits.max_concurrent_jobs:
            raise TooManyConcurrentJobs(in_flight, jobs, limits.max_concurrent_jobs)


class Slot:
    """One request's turn at the database. Release it from any thread, as often as you like:
    only the first release counts."""

    def __init__(self, semaphore: anyio.Semaphore, loop: asyncio.AbstractEventLoop) -> None:
        self._semaphore: anyio.Semaphore | None = semaphore
        self._loop = loop

    def release(self) -> None:
        semaphore, self._semaphore = self._semaphore, None
        # The semaphore belongs to its event loop's thread; a loop that has ended (a test
        # client's) has nobody left to wake.
        if semaphore is None or self._loop.is_closed():
            return
        try:
            on_its_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a thread without a loop: a worker thread closing a session
            on_its_loop = False
        if on_its_loop:
            semaphore.release()  # no need to wake the loop from its own thread
        else:
            self._loop.call_soon_threadsafe(semaphore.release)


class DatabaseSlots:
    """How many requests of this process use Postgres at once, and how long the others wait.

    A request takes its slot on the event loop, before it takes a thread or a connection, and
    holds it until its session is closed. With fewer slots than pooled connections and than
    threads, no request waits for a connection while holding a thread that the request holding
    the connection needs (which is how a burst larger than the pool used to stall every
    submission until the pool's timeout). A request that cannot have its turn within `wait_s`,
    or arrives while `waiting_max` others wait, is answered 503 with Retry-After at once.
    """

    def __init__(self, slots: int, wait_s: float, waiting_max: int) -> None:
        self.slots = slots
        self.wait_s = wait_s
        self.waiting_max = waiting_max
        # One semaphore per event loop (a server has one; tests may start several).
        self._semaphores: RunVar[anyio.Semaphore] = RunVar(f"llmq_database_slots_{id(self)}")

    def _semaphore(self) -> anyio.Semaphore:
        try:
            return self._semaphores.get()
        except LookupError:
            semaphore = anyio.Semaphore(self.slots)
            self._semaphores.set(semaphore)
            return semaphore

    async def acquire(self) -> Slot:
        """This request's slot; ServerBusy (503) when it would wait too long."""
        semaphore = self._semaphore()
        waiting = semaphore.statistics().tasks_waiting
        if semaphore.value > 0 and not waiting:
            # A free slot and nobody before this request: take it without the timeout's cancel
            # scope and the checkpoint, which cost more than the rest of the request's turn.
            semaphore.acquire_nowait()
            return Slot(semaphore, asyncio.get_running_loop())
        if semaphore.value == 0 and waiting >= self.waiting_max:
            raise self._busy(waiting)
        with anyio.move_on_after(self.wait_s):
            await semaphore.acquire()
            return Slot(semaphore, asyncio.get_running_loop())
        raise self._busy(semaphore.statistics().tasks_waiting)

    def _busy(self, waiting: int) -> ServerBusy:
        return ServerBusy(
            f"the server is busy: {self.slots} requests are using the database and {waiting} "
            "more are waiting; retry after the Retry-After seconds"
        )


class RateLimitHeaders:
    """Adds X-RateLimit-Limit/Remaining/Reset to every answer to a request that counted against
    a key's rate limit: errors and event streams too, which bypass FastAPI's response headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                window = scope.get("state", {}).get(STATE_KEY)
                if window is not None:
                    MutableHeaders(scope=message).update(window.headers())
            await send(message)

        await self.app(scope, receive, send_with_limits)
