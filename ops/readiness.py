"""Readiness of the stack: the API answering, a worker consuming the model's queue, and, once
the stack is up, saying when a restarted worker consumes again."""

import time

import httpx
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from ops.console import say
from ops.supervisor import Supervisor

READY_TIMEOUT_S = 180.0
PROGRESS_EVERY_S = 5.0
INSPECT_TIMEOUT_S = 1.0


class QueueWatch:
    """Whether a worker consumes one of `queues`, asked with Celery's broadcast as the API's
    live-queue poll asks it (api/fleet/live_workers.py)."""

    def __init__(self, broker_url: str, queues: set[str]) -> None:
        # An app of its own, whose connections close() can drop before Redis is stopped.
        self.celery = Celery("llmq-devstack", broker=broker_url, set_as_current=False)
        self.queues = queues

    def consumed(self) -> str | None:
        """The first of the queues that a worker answers it consumes, or None. Takes about
        INSPECT_TIMEOUT_S: the broadcast waits that long for replies."""
        inspect = self.celery.control.inspect(timeout=INSPECT_TIMEOUT_S)
        try:
            replies = inspect.active_queues() or {}
        except (OperationalError, redis.RedisError, OSError):
            time.sleep(INSPECT_TIMEOUT_S)  # the broker is away: ask again later
            return None
        names = (queue["name"] for queues in replies.values() for queue in queues)
        return next((name for name in names if name in self.queues), None)

    def close(self) -> None:
        self.celery.pool.force_close_all()


def wait_for_api(url: str, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {READY_TIMEOUT_S:.0f} s")


def wait_for_worker(
    watch: QueueWatch,
    supervisor: Supervisor,
    model: str,
    timeout_s: float = READY_TIMEOUT_S,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> str | None:
    """The queue a worker consumes, once one does, with a progress line meanwhile; None if
    none does within timeout_s. A job sent before then would wait for the model to load."""
    started = supervisor.clock()
    next_progress = started + progress_every_s
    while (queue := watch.consumed()) is None:
        supervisor.check()
        waited_s = supervisor.clock() - started
        if waited_s >= timeout_s:
            return None
        if supervisor.clock() >= next_progress:
            restart_at = supervisor.children["worker"].restart_at
            doing = (f"restart in {restart_at - supervisor.clock():.0f} s" if restart_at is not None
                     else f"load {model} and consume its queue")  # fmt: skip
            say(f"waiting for the worker to {doing} ({waited_s:.0f} s so far)")
            next_progress += progress_every_s
    return queue


def serve(supervisor: Supervisor, watch: QueueWatch, consuming: bool) -> None:
    """Keep the stack running until interrupted, and say when the worker (again) consumes."""
    while True:
        if "worker" in supervisor.check():
            consuming = False
            say("jobs wait in the queue until the restarted worker consumes it")
        if not consuming and (queue := watch.consumed()) is not None:
            say(f"the worker consumes {queue}: jobs run")
            consuming = True
        else:
            time.sleep(0.5)
