"""The final-event listener's marks: a request that waits for jobs it has just submitted may skip
their replay buffers only while the listener's subscription has stood since before the jobs
could be sent, and never for a job whose final event came before the request watched it."""

import asyncio
import time
import uuid

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from api.results import final_events
from api.results.final_events import FinalEventListener
from llmq.events import FINAL_PREFIX
from tests.faults import CuttableLink


def run_with_listener(redis_url: str, body):
    async def run():
        redis = AsyncRedis.from_url(redis_url)
        listener = FinalEventListener(redis)
        listener.start()
        try:
            assert await listener.wait_listening(5)
            return await body(listener)
        finally:
            await listener.stop()
            await redis.aclose()

    return asyncio.run(run())


def publish_final(redis: Redis, job_id: uuid.UUID) -> None:
    redis.publish(f"{FINAL_PREFIX}{job_id}", f'1-0 done {{"job": "{job_id}"}}')


async def heard(listener: FinalEventListener, job_id: uuid.UUID) -> None:
    """Until the listener has taken in the job's published final event (watched or not)."""
    deadline = time.monotonic() + 5
    while str(job_id) not in listener._unwatched:
        assert time.monotonic() < deadline, "the final event never reached the listener"
        await asyncio.sleep(0.01)


def test_a_final_event_after_the_watch_reaches_it_and_nothing_was_missed(redis_url):
    redis = Redis.from_url(redis_url)
    job_id = uuid.uuid4()

    async def body(listener: FinalEventListener):
        since = listener.mark()
        assert since is not None
        published = listener.watch(job_id)
        assert not listener.may_have_missed(job_id, since)
        publish_final(redis, job_id)
        assert (await asyncio.wait_for(published, 5)).startswith("1-0 done")
        listener.unwatch(job_id, published)

    run_with_listener(redis_url, body)


def test_a_final_event_before_the_watch_is_known_to_have_been_missed(redis_url):
    redis = Redis.from_url(redis_url)
    early, other = uuid.uuid4(), uuid.uuid4()

    async def body(listener: FinalEventListener):
        since = listener.mark()
        publish_final(redis, early)  # the job ended before its submitter watched it
        await heard(listener, early)
        for job_id in (early, other):
            listener.watch(job_id)
        assert listener.may_have_missed(early, since)
        assert not listener.may_have_missed(other, since)
        assert listener.may_have_missed(other, None)  # no mark: always look

    run_with_listener(redis_url, body)


def test_forgetting_an_event_that_came_after_a_mark_spends_it(redis_url, monkeypatch):
    monkeypatch.setattr(final_events, "UNWATCHED_KEPT", 2)
    redis = Redis.from_url(redis_url)
    job_id = uuid.uuid4()

    async def body(listener: FinalEventListener):
        before = [uuid.uuid4() for _ in range(2)]
        for other in before:
            publish_final(redis, other)
        await heard(listener, before[-1])
        since = listener.mark()
        newer = uuid.uuid4()
        publish_final(redis, newer)  # forgets one from before the mark: still complete
        await heard(listener, newer)
        listener.watch(job_id)
        assert not listener.may_have_missed(job_id, since)
        for other in [uuid.uuid4() for _ in range(2)]:  # forgets `newer`, heard after the mark
            publish_final(redis, other)
            await heard(listener, other)
        assert listener.may_have_missed(job_id, since)
        assert not listener.may_have_missed(job_id, listener.mark())

    run_with_listener(redis_url, body)


def test_a_subscription_broken_since_the_mark_spends_it(redis_url):
    link = CuttableLink(6379)
    job_id = uuid.uuid4()

    async def body(listener: FinalEventListener):
        since = listener.mark()
        link.cut()
        deadline = time.monotonic() + 5
        while listener.listening:
            assert time.monotonic() < deadline, "the listener never saw the cut"
            await asyncio.sleep(0.01)
        assert listener.mark() is None
        listener.watch(job_id)
        assert listener.may_have_missed(job_id, since)
        link.restore()
        assert await listener.wait_listening(10)
        assert listener.may_have_missed(job_id, since)  # events may have come in the gap
        assert not listener.may_have_missed(job_id, listener.mark())

    try:
        run_with_listener(link.url_for(redis_url), body)
    finally:
        link.close()
