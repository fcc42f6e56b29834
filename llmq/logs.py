"""structlog set-up shared by the API and the workers: JSON lines, or console output for people.

Every line carries the ids bound in its context: the request id in the API (api/http/middleware.py);
the job id, model, queue and request id in a worker thread while it runs a job. With tracing on
(llmq/tracing.py), lines written inside a recorded span carry its trace_id and span_id too, and
a worker's lines about a job carry the job's (workers/job_trace.py). Lines from the
standard library's loggers (Celery, kombu) go through the same renderer, so JSON stays JSON.
"""

import logging
import sys
import uuid
from contextlib import AbstractContextManager

import structlog

from llmq import tracing


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if tracing.enabled():  # configure tracing first; off, lines pay nothing for it
        shared.append(tracing.log_ids)
    renderer = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write per line: print() writes the line and its newline apart, so a line from
        # another thread (a Celery line through the handler below) could land between them.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    # Like basicConfig, this leaves a root logger that already has handlers alone.
    logging.basicConfig(level=level.upper(), handlers=[handler])


def job_log_context(job_id: uuid.UUID, model: str, queue: str) -> AbstractContextManager[None]:
    """Bind a job's ids to every log line of this thread inside the block. The request id
    starts empty, so that none is left over from the thread's previous job; the runner binds
    it once it has read the job."""
    return structlog.contextvars.bound_contextvars(
        job_id=str(job_id), model=model, queue=queue, request_id=None
    )
