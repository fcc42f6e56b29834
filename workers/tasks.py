"""Thin Celery task adapters; the work happens in workers.runner and workers.score_runner."""

import uuid

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
from workers.app import app, get_runtime


@app.task(name=GENERATE_TASK)
def generate(payload: dict) -> None:
    """Run one generation job; the message is acknowledged once its outcome is in Postgres."""
    job_id = uuid.UUID(str(GenerateTask.model_validate(payload).job_id))
    runtime = get_runtime()
    with _log_context(runtime, job_id):
        runtime.runner.run(job_id)


@app.task(name=GENERATE_GROUP_TASK)
def generate_group(payload: dict) -> None:
    """Run several generation jobs sent together, acknowledged once every one has ended; its
    log lines name their job each."""
    job_ids = GenerateGroupTask.model_validate(payload).job_ids
    get_runtime().runner.run_group(job_ids)


@app.task(name=SCORE_TASK)
def score(payload: dict) -> None:
    """Run one scoring job (log-likelihood of continuations), acknowledged once stored."""
    job_id = uuid.UUID(str(ScoreTask.model_validate(payload).job_id))
    runtime = get_runtime()
    with _log_context(runtime, job_id):
        runtime.score_runner.run(job_id)


@app.task(name=SCORE_GROUP_TASK)
def score_group(payload: dict) -> None:
    """Run several scoring jobs (evaluation items), acknowledged once every one has ended; its
    log lines name their job each."""
    job_ids = ScoreGroupTask.model_validate(payload).job_ids
    get_runtime().score_runner.run_group(job_ids)


def _log_context(runtime, job_id: uuid.UUID):
    spec, device = runtime.host.spec, runtime.host.device
    return job_log_context(job_id, spec.id, spec.queue(device))
