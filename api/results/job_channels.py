"""The live channels of the jobs this API process streams, all read on one Redis subscription.

A stream used to subscribe on a connection of its own: a connection and its handshake made for
every stream, and a read with a timeout of its own for every event. Here one connection carries
every stream's SUBSCRIBE and UNSUBSCRIBE, one task reads every channel's messages and hands
each to the streams of its job, and a stream waits for a message without a task or a timeout
of the connection's. A stream waits for Redis to confirm its subscription before it reads the
job's replay buffer, so nothing published in between is missed.

The connection makes no retries of its own: redis-py would subscribe again after reconnecting,
and what was published meanwhile would be missing from the streams without their knowing. When
it fails, every subscription is told (its stream goes on from Postgres) and a new connection is
made; a stream that starts while there is none is told at once.
"""

import asyncio
from collections import defaultdict, deque

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

RECONNECT_S = 0.5


class Subscription:
    """One stream's subscription to its job's channel: the messages' data, in order."""

    def __init__(self, channels: "JobChannels", channel: bytes) -> None:
        self.channel = channel
        self._channels = channels
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: RedisError | None = None

    async def next(self, timeout: float) -> bytes | None:
        """The next message's data, or None after `timeout` of quiet; raises RedisError once
        the subscription is lost."""
        if not self._messages and self._lost is None:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._messages:
            return self._messages.popleft()
        if self._lost is not None:
            raise self._lost
        return None

    def close(self) -> None:
        """Leave the channel (synchronous, so that a stream's cleanup cannot be cut short)."""
        self._channels._leave(self)

    def _deliver(self, data: bytes) -> None:
        self._messages.append(data)
        if self._waiter is not None:
            _wake(self._waiter)

    def _lose(self, error: RedisError) -> None:
        self._lost = error
        if self._waiter is not None:
            _wake(self._waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Channel:
    """A channel's subscriptions in this process, and Redis's confirmation of its SUBSCRIBE."""

    def __init__(self, confirmed: asyncio.Future[None]) -> None:
        self.confirmed = confirmed
        self.subscriptions: set[Subscription] = set()


class JobChannels:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
        self._channels: dict[bytes, _Channel] = {}
        # Per channel, the confirmations awaited for SUBSCRIBE commands sent, oldest first:
        # a channel left and joined again has two in flight, and Redis confirms both in order.
        self._awaited: defaultdict[bytes, deque[asyncio.Future[None]]] = defaultdict(deque)
        # SUBSCRIBE and UNSUBSCRIBE to send; None ends the sender (redis-py's commands swallow
        # a cancellation, so the sender is told to end, not cancelled).
        self._commands: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._connected = False
        self._task: asyncio.Task | None = None

    @property
    def listening(self) -> bool:
        return self._connected

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmq-channels")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()

    async def wait_listening(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._connected and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self._connected

    async def subscribe(self, channel: str) -> Subscription:
        """A subscription to `channel` once Redis has confirmed it; raises RedisError when there
        is no connection to Redis, or it fails before confirming."""
        if not self._connected:
            raise RedisConnectionError("no connection to Redis for streams")
        key = channel.encode()
        subscription = Subscription(self, key)
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _Channel(asyncio.get_running_loop().create_future())
            self._awaited[key].append(state.confirmed)
            self._commands.put_nowait(("subscribe", key))
        state.subscriptions.add(subscription)
        try:
            await asyncio.shield(state.confirmed)
        except BaseException:
            subscription.close()
            raise
        return subscription

    def _leave(self, subscription: Subscription) -> None:
        state = self._channels.get(subscription.channel)
        if state is None or subscription not in state.subscriptions:
            return  # lost with the connection, or left already
        state.subscriptions.discard(subscription)
        if not state.subscriptions:
            del self._channels[subscription.channel]
            self._commands.put_nowait(("unsubscribe", subscription.channel))

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            tasks: list[asyncio.Task] = []
            error: RedisError = RedisConnectionError("the connection to Redis for streams failed")
            try:
                await pubsub.connect()
                self._connected = True
                tasks = [
                    asyncio.create_task(self._read(pubsub)),
                    asyncio.create_task(self._send(pubsub)),
                ]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and isinstance(task.exception(), RedisError):
                        error = task.exception()  # type: ignore[assignment]
                log.warning("stream subscriptions lost Redis; reconnecting", error=str(error))
            except (RedisError, OSError) as exc:
                error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
            finally:
                self._connected = False
                self._commands.put_nowait(None)
                if tasks:
                    tasks[0].cancel()  # the reader
                await _close(pubsub)  # a read or a send still under way fails
                await asyncio.gather(*tasks, return_exceptions=True)
                self._lose_all(error)
            await asyncio.sleep(RECONNECT_S)

    async def _read(self, pubsub) -> None:
        while True:
            response = await pubsub.parse_response(block=True)
            message = await pubsub.handle_message(response)
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "message":
                state = self._channels.get(channel)
                for subscription in state.subscriptions if state is not None else ():
                    subscription._deliver(message["data"])
            elif kind == "subscribe":
                awaited = self._awaited.get(channel)
                if awaited:
                    _confirm(awaited.popleft())
                    if not awaited:
                        del self._awaited[channel]

    async def _send(self, pubsub) -> None:
        """Commands in the order asked; those waiting go together, a run of one kind as one."""
        while True:
            commands = [await self._commands.get()]
            while not self._commands.empty():
                commands.append(self._commands.get_nowait())
            if None in commands:
                return
            runs: list[tuple[str, list[bytes]]] = []
            for kind, key in filter(None, commands):
                if runs and runs[-1][0] == kind:
                    runs[-1][1].append(key)
                else:
                    runs.append((kind, [key]))
            for kind, keys in runs:
                if kind == "subscribe":
                    await pubsub.subscribe(*keys)
                else:
                    await pubsub.unsubscribe(*keys)

    def _lose_all(self, error: RedisError) -> None:
        for state in self._channels.values():
            for subscription in state.subscriptions:
                subscription._lose(error)
            if not state.confirmed.done():
                state.confirmed.set_exception(error)
                state.confirmed.exception()  # retrieved: a waiter may have gone
        self._channels.clear()
        self._awaited.clear()
        while not self._commands.empty():
            self._commands.get_nowait()


def _confirm(confirmed: asyncio.Future[None]) -> None:
    if not confirmed.done():
        confirmed.set_result(None)


async def _close(pubsub) -> None:
    try:
        await pubsub.aclose()
    except (RedisError, OSError):
        pass
