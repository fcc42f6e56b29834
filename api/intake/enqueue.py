"""The one module that owns queue routing and puts jobs on the broker."""

import threading
import time
import uuid
from collections import defaultdict
from functools import lru_cache
from queue import Empty, SimpleQueue

import structlog
from celery import Celery

from db.queries.jobs import Delivery
from llmq.protocol import (
    GENERATE_GROUP_TASK,
    GENERATE_TASK,
    JOB_IDS_HEADER,
    SCORE_GROUP_TASK,
    SCORE_TASK,
    JobGroupTask,
    JobKind,
)
from llmq.registry import ModelSpec
from llmq.settings import get_settings
from llmq.tracing import attached, quiet_unless_traced

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
GROUP_TASK_FOR_KIND = {
    JobKind.GENERATE.value: GENERATE_GROUP_TASK,
    JobKind.SCORE.value: SCORE_GROUP_TASK,
}
# Jobs per group message. A worker claims a message's jobs together and runs them side by side
# in its engine; past a few jobs a message costs each of them little more, while larger groups
# would spread a burst over several workers less evenly.
MAX_JOBS_PER_MESSAGE = 16
# The wait for more jobs of a burst (see _Sender._linger): the gap that ends a burst.
LINGER_GAP_S = 0.001


def enqueue_job(
    job_id: uuid.UUID, kind: str, queue: str, priority: int = 0, trace_context: str | None = None
) -> bool:
    """Send after the job row is committed. False if the broker is unreachable: the job row
    stays queued and the reconciler sends it later, so the client's 202 still holds. The
    job's trace context, when it has one, goes in the message's headers too."""
    with attached(trace_context):
        return _send(TASK_FOR_KIND[kind], {"job_id": str(job_id)}, str(job_id), queue, priority)


def enqueue_score_group(job_ids: list[uuid.UUID], queue: str, priority: int) -> bool:
    """Several committed scoring jobs in one message (evaluation items). As for enqueue_job,
    a failed send leaves them queued for the reconciler, which then sends each alone."""
    return _send_group(JobKind.SCORE.value, job_ids, queue, priority)


def send_jobs(deliveries: list[Delivery]) -> list[uuid.UUID]:
    """Send committed jobs, those of one kind, queue and priority together in group messages.
    Returns the ids of the jobs sent; the others stay queued for the reconciler."""
    groups: dict[tuple[str, str, int], list[uuid.UUID]] = defaultdict(list)
    for job in deliveries:
        groups[job.kind, job.queue, job.priority].append(job.id)
    contexts = {job.id: job.trace_context for job in deliveries if job.trace_context}
    sent: list[uuid.UUID] = []
    for (kind, queue_name, priority), job_ids in groups.items():
        for start in range(0, len(job_ids), MAX_JOBS_PER_MESSAGE):
            chunk = job_ids[start : start + MAX_JOBS_PER_MESSAGE]
            # A group message's jobs may belong to as many traces: their rows carry each one's.
            trace_context = contexts.get(chunk[0]) if len(chunk) == 1 else None
            if len(chunk) == 1 and enqueue_job(chunk[0], kind, queue_name, priority, trace_context):
                sent += chunk
            elif len(chunk) > 1 and _send_group(kind, chunk, queue_name, priority):
                sent += chunk
    return sent


def send_soon(job: Delivery) -> None:
    """Send a committed job from the sender thread, without waiting for the broker."""
    _sender().put(job)


class _Sender:
    """Sends the jobs committed by concurrent requests from one thread: those that wait while
    a send is on its way go out together, in one message per kind, queue and priority. One
    message per job cost the API, the broker and the worker more than a job's whole run."""

    def __init__(self, linger_s: float, gap_s: float = LINGER_GAP_S) -> None:
        self.linger_s, self.gap_s = linger_s, gap_s
        self._waiting: SimpleQueue[Delivery] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llmq-sender", daemon=True)

    def start(self) -> "_Sender":
        self._thread.start()
        return self

    def put(self, job: Delivery) -> None:
        self._waiting.put(job)

    def _run(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            self._take_waiting(jobs)
            self._linger(jobs)
            try:
                send_jobs(jobs)
            except Exception:  # a failed send is the reconciler's; the thread must live on
                send_failed.set()
                log.exception("sending jobs failed; they stay queued", jobs=len(jobs))

    def _take_waiting(self, jobs: list[Delivery]) -> None:
        while len(jobs) < MAX_JOBS_PER_MESSAGE * 16:
            try:
                jobs.append(self._waiting.get_nowait())
            except Empty:
                return

    def _linger(self, jobs: list[Delivery]) -> None:
        """While jobs arrive together (the clients of a batch that just finished send their next
        ones), wait for the rest of the burst, a gap at a time, up to `linger_s`: each message
        costs the API, the broker and the worker (its delivery, claim, acknowledgement and
        events) the same whatever its jobs. A lone job goes at once."""
        deadline = time.monotonic() + self.linger_s
        while 1 < len(jobs) < MAX_JOBS_PER_MESSAGE and time.monotonic() < deadline:
            before = len(jobs)
            time.sleep(self.gap_s)
            self._take_waiting(jobs)
            if len(jobs) == before:
                return


@lru_cache
def _sender() -> _Sender:
    return _Sender(get_settings().send_linger_ms / 1000).start()


def _send_group(kind: str, job_ids: list[uuid.UUID], queue: str, priority: int) -> bool:
    payload = JobGroupTask(job_ids=job_ids).model_dump(mode="json")
    headers = {JOB_IDS_HEADER: payload["job_ids"]}
    task_id = str(uuid.uuid4())
    with quiet_unless_traced():  # its jobs' traces are in their rows, not in the message
        return _send(GROUP_TASK_FOR_KIND[kind], payload, task_id, queue, priority, headers)


def _send(
    task: str, payload: dict, task_id: str, queue: str, priority: int, headers: dict | None = None
) -> bool:
    try:
        producer().send_task(
            task,
            args=[payload],
            task_id=task_id,
            headers=headers,
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
