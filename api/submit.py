"""Turning a validated request into a stored, queued job: shared by every endpoint that submits."""

from dataclasses import dataclass

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.enqueue import enqueue_generate, route
from api.live_workers import LiveQueues
from api.metrics import job_submitted
from api.prompts import PromptCounter
from db.queries import jobs as job_queries
from db.tables import Job
from llmq.errors import ModelNotServed
from llmq.protocol import JobKind, SamplingParams
from llmq.registry import ModelSpec, Registry

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Submission:
    job: Job
    created: bool  # False when an earlier job with the same idempotency key was returned


def resolve_model(registry: Registry, model: str) -> ModelSpec:
    spec = registry.get(model)
    if spec is None:
        raise ModelNotServed(model, registry.ids)
    return spec


def submit_generation(
    session: Session,
    *,
    spec: ModelSpec,
    prompt: str,
    params: SamplingParams,
    counter: PromptCounter,
    live: LiveQueues,
    idempotency_key: str | None = None,
    owner: str | None = None,
    request_id: str | None = None,
    timeout_s: float | None = None,
) -> Submission:
    """Check the prompt fits, commit the job row, then enqueue it (in that order)."""
    if idempotency_key is not None:
        existing = job_queries.find_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return Submission(existing, created=False)
    counter.check_fits(spec, prompt, params.max_tokens)
    new_job = job_queries.NewJob(
        kind=JobKind.GENERATE.value,
        model=spec.id,
        queue=route(spec, live.queues),
        input={"prompt": prompt},
        params=params.model_dump(mode="json"),
        owner=owner,
        idempotency_key=idempotency_key,
        request_id=request_id,
        timeout_s=timeout_s,
    )
    try:
        job = job_queries.create_job(session, new_job)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = job_queries.find_by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return Submission(existing, created=False)
    enqueue_generate(job.id, job.queue)
    job_submitted(job.model, job.queue)
    log.info("job queued", job_id=str(job.id), model=job.model, queue=job.queue)
    return Submission(job, created=True)
