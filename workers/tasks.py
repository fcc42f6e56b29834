"""Thin Celery task adapters; the work happens in workers.runner and workers.score_runner.

Each message leases the model of the queue it came from (workers/model_pool.py) for as long as
its jobs run. A message whose model cannot be had soon, or whose jobs were handed back by a
forced unload, goes back to the queue (Reject with requeue): nothing of it was claimed or kept.
"""

import uuid
from contextlib import contextmanager

import structlog
from celery import Task
from celery.exceptions import Reject

from llmq.logs import job_log_context
from llmq.protocol import (
    GENERATE_GROUP_TASK,
    GENERATE_TASK,
    SCORE_GROUP_TASK,
    SCORE_TASK,
    GenerateGroupTask,
    GenerateTask,
    ScoreGroupTask,
    ScoreTask,
)
from llmq.registry import queue_model
from workers.app import app, get_pool
from workers.model_pool import ModelUnavailable

log = structlog.get_logger(__name__)


@app.task(name=GENERATE_TASK, bind=True)
def generate(self: Task, payload: dict) -> None:
    """Run one generation job; the message is acknowledged once its outcome is in Postgres."""
    job_id = uuid.UUID(str(GenerateTask.model_validate(payload).job_id))
    with _leased(self) as runtime, _log_context(runtime, job_id):
        _requeue_if_handed_back(runtime.runner.run(job_id))


@app.task(name=GENERATE_GROUP_TASK, bind=True)
def generate_group(self: Task, payload: dict) -> None:
    """Run several generation jobs sent together, acknowledged once every one has ended; its
    log lines name their job each."""
    job_ids = GenerateGroupTask.model_validate(payload).job_ids
    with _leased(self) as runtime:
        _requeue_if_handed_back(runtime.runner.run_group(job_ids))


@app.task(name=SCORE_TASK, bind=True)
def score(self: Task, payload: dict) -> None:
    """Run one scoring job (log-likelihood of continuations), acknowledged once stored."""
    job_id = uuid.UUID(str(ScoreTask.model_validate(payload).job_id))
    with _leased(self) as runtime, _log_context(runtime, job_id):
        _requeue_if_handed_back(runtime.score_runner.run(job_id))


@app.task(name=SCORE_GROUP_TASK, bind=True)
def score_group(self: Task, payload: dict) -> None:
    """Run several scoring jobs (evaluation items), acknowledged once every one has ended; its
    log lines name their job each."""
    job_ids = ScoreGroupTask.model_validate(payload).job_ids
    with _leased(self) as runtime:
        _requeue_if_handed_back(runtime.score_runner.run_group(job_ids))


@contextmanager
def _leased(task: Task):
    """The runtime of the message's model, leased while its jobs run."""
    pool = get_pool()
    queue = (task.request.delivery_info or {}).get("routing_key") or ""
    model = queue_model(queue) or _only_model(pool.specs)
    try:
        with pool.lease(model) as runtime:
            if runtime is None:
                log.info("model not loaded here soon; message back to the queue", queue=queue)
                raise Reject("model not available on this worker now", requeue=True)
            yield runtime
    except ModelUnavailable as exc:
        log.warning("model unavailable; message back to the queue", queue=queue, error=str(exc))
        raise Reject(str(exc), requeue=True) from exc


def _only_model(specs: dict) -> str:
    if len(specs) != 1:
        raise Reject("a message without its queue's name on a worker of several models")
    return next(iter(specs))


def _requeue_if_handed_back(handed_back: int) -> None:
    if handed_back:
        raise Reject(f"{handed_back} job(s) handed back: their model was unloaded", requeue=True)


def _log_context(runtime, job_id: uuid.UUID):
    spec, device = runtime.host.spec, runtime.host.device
    return job_log_context(job_id, spec.id, spec.queue(device))
