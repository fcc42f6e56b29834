"""The job channels of an API process on one Redis subscription: messages to every stream of
their job, subscriptions confirmed before they are used and left when their streams end, and a
lost connection told to every stream."""

import asyncio
import time
import uuid

import pytest
from redis import Redis
from redis.exceptions import RedisError

from api.results.job_channels import JobChannels
from tests.faults import CuttableLink


def run_with_channels(redis_url: str, body):
    async def run():
        channels = JobChannels(redis_url)
        channels.start()
        try:
            assert await channels.wait_listening(5)
            return await body(channels)
        finally:
            await channels.stop()

    return asyncio.run(run())


def name(what: str) -> str:
    """Channels are the server's, not a database's: a name no other run can use."""
    return f"llmq:test:{what}:{uuid.uuid4().hex}"


def wait_unsubscribed(redis: Redis, channel: str) -> None:
    deadline = time.monotonic() + 5
    while redis.pubsub_numsub(channel)[0][1] != 0:
        assert time.monotonic() < deadline, f"{channel} is still subscribed"
        time.sleep(0.02)


def test_messages_reach_every_subscription_of_their_channel_in_order(redis_url):
    redis = Redis.from_url(redis_url)
    a, b = name("a"), name("b")

    async def body(channels: JobChannels):
        first, second = await channels.subscribe(a), await channels.subscribe(a)
        other = await channels.subscribe(b)
        for number in range(3):
            redis.publish(a, f"a{number}")
        redis.publish(b, "b0")
        got = [[await s.next(5) for _ in range(3)] for s in (first, second)]
        assert got == [[b"a0", b"a1", b"a2"]] * 2
        assert await other.next(5) == b"b0"
        assert await other.next(0.05) is None  # quiet
        for subscription in (first, second, other):
            subscription.close()

    run_with_channels(redis_url, body)
    for channel in (a, b):
        wait_unsubscribed(redis, channel)


def test_subscription_stands_in_redis_when_subscribe_returns(redis_url):
    redis = Redis.from_url(redis_url)
    channel = name("confirmed")

    async def body(channels: JobChannels):
        subscription = await channels.subscribe(channel)
        assert redis.pubsub_numsub(channel)[0][1] == 1
        subscription.close()

    run_with_channels(redis_url, body)


def test_a_channel_left_and_joined_again_at_once_stays_subscribed(redis_url):
    redis = Redis.from_url(redis_url)
    channel, left = name("again"), name("left")

    async def body(channels: JobChannels):
        (await channels.subscribe(channel)).close()  # its UNSUBSCRIBE is not sent yet
        joined = await channels.subscribe(channel)
        redis.publish(channel, "still here")
        assert await joined.next(5) == b"still here"
        joined.close()
        # Left while its SUBSCRIBE waits to be sent: both go, in order.
        pending = asyncio.create_task(channels.subscribe(left))
        await asyncio.sleep(0)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await asyncio.sleep(0.1)

    run_with_channels(redis_url, body)
    for each in (channel, left):
        wait_unsubscribed(redis, each)


def test_a_lost_connection_is_told_to_every_subscription_and_made_again(redis_url):
    link = CuttableLink(6379)
    redis = Redis.from_url(redis_url)
    channel = name("lost")

    async def body(channels: JobChannels):
        subscription = await channels.subscribe(channel)
        waiting = asyncio.create_task(subscription.next(30))
        await asyncio.sleep(0.05)
        link.cut()
        with pytest.raises(RedisError):
            await waiting
        with pytest.raises(RedisError):  # told at once, not left waiting
            await channels.subscribe(channel)
        link.restore()
        assert await channels.wait_listening(10)
        again = await channels.subscribe(channel)
        redis.publish(channel, "back")
        assert await again.next(5) == b"back"
        again.close()

    try:
        run_with_channels(link.url_for(redis_url), body)
    finally:
        link.close()
