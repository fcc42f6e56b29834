"""Turning a validated request into a stored, queued job: shared by every endpoint that submits.

A deterministic request may not need a run of its own: it is answered from the completion cache
when an identical one has finished, or follows an identical one that is queued or running (see
db/queries/cache.py). Either way it still gets a job row like any other.
"""

from dataclasses import dataclass, replace
from enum import StrEnum

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.enqueue import enqueue_job, route
from api.live_workers import LiveQueues
from api.metrics import job_submitted
from api.prompts import PromptCounter
from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.tables import Job
from llmq.errors import ModelNotServed
from llmq.fingerprint import Fingerprint, fingerprint, is_deterministic, model_revisions
from llmq.metrics import CACHE_HITS, CACHE_MISSES, job_finished
from llmq.protocol import INTERACTIVE_PRIORITY, JobKind, JobStatus, SamplingParams
from llmq.registry import ModelSpec, Registry
from llmq.settings import get_settings

log = structlog.get_logger(__name__)


class Placement(StrEnum):
    """Where a new job went."""

    QUEUED = "queued"  # sent to its model's queue
    CACHED = "cached"  # answered from the completion cache: it has succeeded already
    FOLLOWING = "following"  # gets the outcome of the identical job in flight


@dataclass(frozen=True)
class Submission:
    job: Job
    created: bool  # False when an earlier job with the same idempotency key was returned
    placement: Placement = Placement.QUEUED


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
    priority: int = INTERACTIVE_PRIORITY,
    batch_id: str | None = None,
    use_cache: bool = True,
) -> Submission:
    """Check the prompt fits, commit the job row, then enqueue it (in that order). A
    deterministic request is answered from the cache, or follows an identical job in flight,
    unless `use_cache` is False."""
    if idempotency_key is not None:
        existing = job_queries.find_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return Submission(existing, created=False)
    counter.check_fits(spec, prompt, params.max_tokens)
    queue = route(spec, live.queues)
    key = cache_fingerprint(spec, queue, prompt, params) if use_cache else None
    job_input: dict = {"prompt": prompt}
    if key is not None:  # the worker stores the cache entry under exactly this key
        job_input[cache_queries.FINGERPRINT_FIELD] = key.as_json()
    new_job = job_queries.NewJob(
        kind=JobKind.GENERATE.value,
        model=spec.id,
        queue=queue,
        input=job_input,
        params=params.model_dump(mode="json"),
        owner=owner,
        idempotency_key=idempotency_key,
        request_id=request_id,
        timeout_s=timeout_s,
        priority=priority,
        batch_id=batch_id,
        cache_key=key.cache_key if key is not None else None,
    )
    try:
        job, placement = _store(session, new_job, key)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = job_queries.find_by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return Submission(existing, created=False)
    if key is not None:
        (CACHE_HITS if placement is Placement.CACHED else CACHE_MISSES).labels(job.model).inc()
    if placement is Placement.QUEUED:
        enqueue_job(job.id, job.kind, job.queue, job.priority)
        job_submitted(job.model, job.queue)
    elif placement is Placement.CACHED:
        job_finished(job.model, JobStatus.SUCCEEDED.value)
    log.info(
        f"job {placement.value}",
        job_id=str(job.id),
        model=job.model,
        queue=job.queue,
        follows_job_id=str(job.follows_job_id) if job.follows_job_id else None,
    )
    return Submission(job, created=True, placement=placement)


def cache_fingerprint(
    spec: ModelSpec, queue: str, prompt: str, params: SamplingParams
) -> Fingerprint | None:
    """The request's completion-cache key; None when it may not use the cache (the cache is
    off, the request is sampled without a seed, or the model's weights cannot be told apart)."""
    settings = get_settings()
    if not settings.cache or not is_deterministic(params):
        return None
    revision = model_revisions(settings.data_dir).revision(spec)
    if revision is None:
        return None
    return fingerprint(spec, revision, queue, prompt, params)


def _store(
    session: Session, new: job_queries.NewJob, key: Fingerprint | None
) -> tuple[Job, Placement]:
    """The job row, answered from the cache, following a job in flight, or to be queued."""
    if key is None:
        return job_queries.create_job(session, new), Placement.QUEUED
    ttl_s = get_settings().cache_ttl_s
    if (hit := cache_queries.answer_from_cache(session, key, new, ttl_s)) is not None:
        return hit, Placement.CACHED
    cache_queries.lock_key(session, key.cache_key)
    leader = cache_queries.find_leader(session, key.cache_key, new.priority)
    if leader is not None:
        follower = replace(new, follows_job_id=leader)
        return job_queries.create_job(session, follower), Placement.FOLLOWING
    # The leader may have finished between the first look and the lock.
    if (hit := cache_queries.answer_from_cache(session, key, new, ttl_s)) is not None:
        return hit, Placement.CACHED
    return job_queries.create_job(session, new), Placement.QUEUED
