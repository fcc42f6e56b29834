"""The publisher's final events reach both channels: the job's stream and its final-only
channel, which non-streamed responses wait on; a job's buffer gets its time to live with its
first and final events."""

import uuid

from redis import Redis

from llmq.events import REPLAY_TTL_S, DoneEvent, TokenEvent, events_key, final_channel
from llmq.publisher import TokenEmission, TokenPublisher


def finished(job_id: uuid.UUID, text: str, completion_tokens: int) -> DoneEvent:
    return DoneEvent(
        job_id=job_id,
        status="succeeded",
        finish_reason="length",
        text=text,
        prompt_tokens=1,
        completion_tokens=completion_tokens,
    )


def test_final_event_is_published_on_the_final_channel_too(redis_url):
    job_id = uuid.uuid4()
    subscriber = Redis.from_url(redis_url).pubsub()
    subscriber.subscribe(final_channel(job_id), events_key(job_id))
    for _ in range(2):
        subscriber.get_message(timeout=5)  # the subscribe confirmations
    publisher = TokenPublisher(redis_url)
    done = finished(job_id, "Once", completion_tokens=1)

    publisher.publish_final(job_id, done)
    publisher.close()

    received = {}
    while len(received) < 2 and (message := subscriber.get_message(timeout=5)) is not None:
        received[message["channel"].decode()] = message["data"].decode()
    assert received.keys() == {final_channel(job_id), events_key(job_id)}
    assert received[final_channel(job_id)] == received[events_key(job_id)]
    assert received[final_channel(job_id)].split(" ", 2)[1:] == ["done", done.model_dump_json()]


def test_a_buffers_time_to_live_is_set_with_its_first_and_final_events_only(redis_url):
    redis = Redis.from_url(redis_url)
    job_id = uuid.uuid4()
    key = events_key(job_id)
    publisher = TokenPublisher(redis_url)

    def token(number: int) -> list[TokenEmission]:
        event = TokenEvent(job_id=job_id, token_index=number - 1, text=f" {number}")
        return [TokenEmission(number, event)]

    publisher.publish_tokens(token(1))
    publisher.flush()
    assert 0 < redis.ttl(key) <= REPLAY_TTL_S
    redis.expire(key, 100)  # a later token event leaves it as it is
    publisher.publish_tokens(token(2))
    publisher.flush()
    assert redis.xlen(key) == 2 and redis.ttl(key) <= 100
    publisher.publish_final(job_id, finished(job_id, " 1 2", completion_tokens=2))
    publisher.close()
    assert redis.ttl(key) > REPLAY_TTL_S - 60


def test_past_its_limit_the_publisher_forgets_the_job_it_tracked_longest(redis_url, monkeypatch):
    monkeypatch.setattr("llmq.publisher.MAX_TRACKED_JOBS", 2)
    publisher = TokenPublisher(redis_url)
    first, second, third = (uuid.uuid4() for _ in range(3))
    assert all(publisher._expire_due(job, now=0.0) for job in (first, second, third))
    assert not publisher._expire_due(third, now=1.0)  # still tracked: nothing to send
    assert publisher._expire_due(first, now=1.0)  # forgotten: its time to live is set again
    publisher.close()
