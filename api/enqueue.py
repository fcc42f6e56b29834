"""The one module that owns queue routing and puts jobs on the broker."""

import threading
import uuid
from functools import lru_cache

import structlog
from celery import Celery
from kombu.transport import redis as redis_transport

from llmq.protocol import (
    GENERATE_TASK,
    PRIORITY_STEPS,
    SCORE_GROUP_TASK,
    SCORE_TASK,
    GenerateTask,
    JobKind,
    ScoreGroupTask,
)
from llmq.registry import ModelSpec

log = structlog.get_logger(__name__)

# Set when a send fails: the reconciler then checks every queued job against the broker at its
# next sweep, rather than waiting until the job's message counts as lost.
send_failed = threading.Event()


@lru_cache
def producer() -> Celery:
    """A Celery app used only to send; it shares celeryconfig with the workers."""
    app = Celery("llmq")
    app.config_from_object("celeryconfig")
    return app


def route(spec: ModelSpec, live_queues: set[str]) -> str:
    """The first of the model's devices with a live worker, else its first device."""
    for device in spec.devices:
        if spec.queue(device) in live_queues:
            return spec.queue(device)
    return spec.queue(spec.devices[0])


# The Celery task that runs each kind of job. Every task takes the job id only.
TASK_FOR_KIND = {JobKind.GENERATE.value: GENERATE_TASK, JobKind.SCORE.value: SCORE_TASK}


def enqueue_job(job_id: uuid.UUID, kind: str, queue: str, priority: int = 0) -> bool:
    """Send after the job row is committed. False if the broker is unreachable: the job row
    stays queued and the reconciler sends it later, so the client's 202 still holds."""
    payload = GenerateTask(job_id=job_id).model_dump(mode="json")
    return _send(TASK_FOR_KIND[kind], payload, str(job_id), queue, priority)


def enqueue_score_group(job_ids: list[uuid.UUID], queue: str, priority: int) -> bool:
    """Several committed scoring jobs in one message (evaluation items). As for enqueue_job,
    a failed send leaves them queued for the reconciler, which then sends each alone."""
    payload = ScoreGroupTask(job_ids=job_ids).model_dump(mode="json")
    return _send(SCORE_GROUP_TASK, payload, str(uuid.uuid4()), queue, priority)


def _send(task: str, payload: dict, task_id: str, queue: str, priority: int) -> bool:
    try:
        producer().send_task(
            task,
            args=[payload],
            task_id=task_id,
            queue=queue,
            priority=priority,  # Redis serves priority 0 first: see llmq.protocol
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except Exception as exc:
        send_failed.set()
        log.warning("enqueue failed; jobs stay queued", task_id=task_id, error=str(exc))
        return False
    return True


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue: the queue's name for priority 0, and one
    more per further priority step."""
    separator = redis_transport.Channel.sep
    return [queue] + [f"{queue}{separator}{step}" for step in PRIORITY_STEPS[1:]]
