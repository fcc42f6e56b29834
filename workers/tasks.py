"""Thin Celery task adapters; the work happens in workers.runner."""

import uuid

from llmq.protocol import GENERATE_TASK, GenerateTask
from workers.app import app, get_runtime


@app.task(name=GENERATE_TASK)
def generate(payload: dict) -> None:
    """Run one generation job; the message is acknowledged once its outcome is in Postgres."""
    task = GenerateTask.model_validate(payload)
    get_runtime().runner.run(uuid.UUID(str(task.job_id)))
