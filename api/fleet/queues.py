"""A queue as the broker holds it: the Redis lists kombu keeps for it and the jobs its
messages carry. Read by the metrics (queue depths) and the reconciler (lost messages)."""

from kombu.transport import redis as redis_transport

from llmq.protocol import JOB_IDS_HEADER, PRIORITY_STEPS


def message_job_ids(headers: dict) -> list[str]:
    """The jobs a broker message carries: a group message's job ids, else its task id."""
    return headers.get(JOB_IDS_HEADER) or [headers["id"]]


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: the queue's name for priority 0, and one
    more per further priority step."""
    separator = redis_transport.Channel.sep
    return [queue] + [f"{queue}{separator}{step}" for step in PRIORITY_STEPS[1:]]
