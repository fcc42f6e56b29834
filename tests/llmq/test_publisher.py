"""The publisher's final events reach both channels: the job's stream and its final-only
channel, which non-streamed responses wait on."""

import uuid

from redis import Redis

from llmq.events import DoneEvent, events_key, final_channel
from llmq.publisher import TokenPublisher


def test_final_event_is_published_on_the_final_channel_too(redis_url):
    job_id = uuid.uuid4()
    subscriber = Redis.from_url(redis_url).pubsub()
    subscriber.subscribe(final_channel(job_id), events_key(job_id))
    for _ in range(2):
        subscriber.get_message(timeout=5)  # the subscribe confirmations
    publisher = TokenPublisher(redis_url)
    done = DoneEvent(
        job_id=job_id,
        status="succeeded",
        finish_reason="length",
        text="Once",
        prompt_tokens=1,
        completion_tokens=1,
    )

    publisher.publish_final(job_id, done)
    publisher.close()

    received = {}
    while len(received) < 2 and (message := subscriber.get_message(timeout=5)) is not None:
        received[message["channel"].decode()] = message["data"].decode()
    assert received.keys() == {final_channel(job_id), events_key(job_id)}
    assert received[final_channel(job_id)] == received[events_key(job_id)]
    assert received[final_channel(job_id)].split(" ", 2)[1:] == ["done", done.model_dump_json()]
