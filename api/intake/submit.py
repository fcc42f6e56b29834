"""Turning validated requests into stored, queued jobs: shared by every endpoint that submits.

A deterministic request may not need a run of its own: it is answered from the completion cache
when an identical one has finished, or follows an identical one that is queued or running (see
db/queries/cache.py). Either way it still gets a job row like any other.

Once the commit has returned, the jobs are the client's: nothing after it (the send to the
broker, metrics, logs, the answer) reads Postgres or may fail the request, so a request is
never answered an error for jobs that were stored. The jobs of one request (an OpenAI request's
choices) are stored in one transaction: all of them, or none.
"""

import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import structlog
from opentelemetry.trace import INVALID_SPAN, Span
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from api.fleet.live_workers import LiveQueues
from api.fleet.upstreams import check_remote_params
from api.intake.enqueue import route, send_soon
from api.intake.prompts import PromptCounter, check_prompt_size
from api.metrics import job_submitted
from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.tables import Job
from llmq.errors import IdempotencyKeyReused, ModelNotServed
from llmq.fingerprint import Fingerprint, fingerprint, is_deterministic, model_revisions
from llmq.metrics import CACHE_HITS, CACHE_MISSES, job_finished
from llmq.price_book import get_price_book
from llmq.protocol import (
    INTERACTIVE_PRIORITY,
    PROMPT_TOKEN_IDS_FIELD,
    JobKind,
    JobStatus,
    SamplingParams,
)
from llmq.registry import ModelSpec, Registry
from llmq.settings import get_settings
from llmq.tracing import current_traceparent, request_traced, tracer

log = structlog.get_logger(__name__)

# After a COMMIT whose answer was lost (the connection broke), how long to keep asking Postgres
# whether it took effect before the request is answered 503.
CONFIRM_COMMIT_S = 3.0
CONFIRM_RETRY_S = 0.25


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


@dataclass(frozen=True)
class GenerationRequest:
    """One job to submit: what the model gets and whose it is."""

    spec: ModelSpec
    prompt: str
    params: SamplingParams
    idempotency_key: str | None = None
    owner: str | None = None
    request_id: str | None = None
    timeout_s: float | None = None
    priority: int = INTERACTIVE_PRIORITY
    batch_id: str | None = None
    use_cache: bool = True
    prompt_tokens: int | None = None  # when the caller has counted them already
    # The prompt as token ids, when the client sent it so (`prompt` is then their text).
    prompt_token_ids: list[int] | None = None
    # Its text published token by token for streams; False: whole when it ends (a
    # non-streamed OpenAI request, whose answer waits for the end anyway).
    stream_tokens: bool = True


def resolve_model(registry: Registry, model: str) -> ModelSpec:
    spec = registry.get(model)
    if spec is None:
        raise ModelNotServed(model, registry.ids)
    return spec


def submit_generations(
    session: Session,
    requests: list[GenerationRequest],
    counter: PromptCounter,
    live: LiveQueues,
) -> list[Submission]:
    """Check every prompt, store all the jobs in one transaction, then enqueue them. An error
    before the commit stores none of them; once the commit has returned, none fails."""
    with submit_span() as span:
        submissions = _submit_generations(session, requests, counter, live)
        describe_submit(span, submissions)
        return submissions


def submit_span():
    """The `llmq.submit` span of a request's jobs, current inside the block; the jobs' rows keep
    its context, so the worker's spans for them are its children. A non-recording span when
    the request is not traced."""
    if not request_traced():
        return nullcontext(INVALID_SPAN)
    return tracer().start_as_current_span("llmq.submit")


def describe_submit(span: Span, submissions: list["Submission"]) -> None:
    if span.is_recording():
        span.set_attributes(submit_attributes(submissions))


def submit_attributes(submissions: list["Submission"]) -> dict[str, Any]:
    """The `llmq.submit` span's attributes: the jobs it stored."""
    return {"llmq.jobs": len(submissions), "llmq.job_ids": [str(s.job.id) for s in submissions]}


def _submit_generations(
    session: Session,
    requests: list[GenerationRequest],
    counter: PromptCounter,
    live: LiveQueues,
) -> list[Submission]:
    if requests and all(r.idempotency_key is not None for r in requests):
        earlier = _earlier(session, requests)
        if earlier is not None:
            return earlier
    new_jobs = _new_jobs(requests, counter, live, current_traceparent())
    try:
        stored = _store_all(session, new_jobs)
        commit_or_confirm(session, [job.id for job, _ in stored])
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        earlier = _earlier(session, requests)
        if earlier is None:
            raise
        return earlier
    announce(stored, new_jobs)
    return [Submission(job, created=True, placement=placement) for job, placement in stored]


# A job checked and ready to store: its row and its completion-cache key.
PreparedJob = tuple[job_queries.NewJob, Fingerprint | None]


def prepare_generations(
    requests: list[GenerationRequest],
    counter: PromptCounter,
    live: LiveQueues,
    trace_context: str | None = None,
) -> list[PreparedJob]:
    """The requests' jobs once every prompt is known to fit (an LlmqError if not), stored by
    `store_prepared`: a caller that stores many requests' jobs together (the Batch driver,
    store_groups.py) checks each request on its own first. `trace_context`: the traceparent
    the jobs' rows keep, whose span the worker's spans for them are children of."""
    return _new_jobs(requests, counter, live, trace_context)


def store_prepared(session: Session, prepared: list[PreparedJob]) -> list[tuple[Job, Placement]]:
    """Store prepared jobs in the session's transaction; the caller commits, then calls
    `announce` (no idempotency keys here: the submit functions handle those)."""
    return _store_all(session, prepared)


def announce(stored: list[tuple[Job, Placement]], prepared: list[PreparedJob]) -> None:
    """After the commit: send, count and log the stored jobs; never raises."""
    for (job, placement), new in zip(stored, prepared, strict=True):
        _after_commit(job, placement, counted=new[1] is not None)


def _earlier(session: Session, requests: list[GenerationRequest]) -> list[Submission] | None:
    """The jobs an earlier request with the same idempotency keys stored; None if it did not."""
    found = [
        job_queries.find_by_idempotency_key(session, r.owner, r.idempotency_key or "")
        for r in requests
    ]
    if all(job is None for job in found):
        return None
    if any(job is None for job in found):
        # Some of these keys stored jobs and some did not: the key was first sent with a
        # request of other choices. Storing the rest would mix two requests under one key.
        stored = sum(job is not None for job in found)
        raise IdempotencyKeyReused(
            f"this Idempotency-Key was used for a request with other choices ({stored} of "
            f"this request's {len(found)} exist); send a new key for a different request",
            param="Idempotency-Key",
        )
    return [Submission(job, created=False) for job in found]


def _new_jobs(
    requests: list[GenerationRequest],
    counter: PromptCounter,
    live: LiveQueues,
    trace_context: str | None,
) -> list[PreparedJob]:
    """Each request's job row and cache key, once every prompt is known to fit (400 if not)."""
    limit = get_settings().max_prompt_chars
    counted: dict[tuple[str, str], int] = {}  # n choices of one prompt are tokenized once
    new_jobs = []
    for request in requests:
        spec, prompt, params = request.spec, request.prompt, request.params
        check_prompt_size(prompt, limit)
        token_ids = request.prompt_token_ids
        tokens = request.prompt_tokens or counted.get((spec.id, prompt))
        if token_ids is not None:
            tokens = len(token_ids)
        elif tokens is None:
            tokens = counted[spec.id, prompt] = counter.count(spec, prompt)
        if params.truncate_prompt_tokens is not None:  # the model sees only the last ones
            tokens = min(tokens, params.truncate_prompt_tokens)
        counter.check_count_fits(spec, tokens, params.max_tokens)
        check_remote_params(spec, params)
        queue = route(spec, live.queues)
        # Token ids are their own prompt: NUL never starts a stored text prompt.
        cache_prompt = prompt if token_ids is None else f"\x00token ids:{token_ids}"
        key = cache_fingerprint(spec, queue, cache_prompt, params) if request.use_cache else None
        job_input: dict = {"prompt": prompt}
        if token_ids is not None:
            job_input[PROMPT_TOKEN_IDS_FIELD] = token_ids
        if key is not None:  # the worker stores the cache entry under exactly this key
            job_input[cache_queries.FINGERPRINT_FIELD] = key.as_json()
        new_job = job_queries.NewJob(
            kind=JobKind.GENERATE.value,
            model=spec.id,
            queue=queue,
            input=job_input,
            params=params.model_dump(mode="json"),
            owner=request.owner,
            idempotency_key=request.idempotency_key,
            request_id=request.request_id,
            timeout_s=request.timeout_s,
            priority=request.priority,
            batch_id=request.batch_id,
            cache_key=key.cache_key if key is not None else None,
            trace_context=trace_context,
            stream_tokens=request.stream_tokens,
        )
        new_jobs.append((new_job, key))
    return new_jobs


def _store_all(session: Session, new_jobs: list[PreparedJob]) -> list[tuple[Job, Placement]]:
    # Several keys are locked in one order, so that two requests that share some never wait
    # for each other in a cycle. (A lock already held is taken again at no cost.)
    keys = sorted({key.cache_key for _, key in new_jobs if key is not None})
    if len(keys) > 1:
        for cache_key in keys:
            cache_queries.lock_key(session, cache_key)
    # Jobs that cannot meet the cache go in one statement (a request's choices, a sweep's
    # Batch API lines); the others one by one, each after its look at the cache.
    inserted = iter(job_queries.insert_jobs(session, [new for new, key in new_jobs if key is None]))
    return [
        (next(inserted), Placement.QUEUED) if key is None else _store(session, new, key)
        for new, key in new_jobs
    ]


def commit_or_confirm(session: Session, job_ids: list[uuid.UUID]) -> None:
    """Commit; if the connection broke on the way, ask Postgres on a new one whether the
    COMMIT took effect, and raise only if it did not, or if Postgres cannot say in time."""
    try:
        session.commit()
    except OperationalError:
        stored = _stored(session, job_ids)
        if stored is not True:
            raise
        session.rollback()  # only resets the session; the transaction is committed
        log.warning("commit answer lost; the jobs are stored", jobs=len(job_ids))


def _stored(session: Session, job_ids: list[uuid.UUID]) -> bool | None:
    """Whether the jobs' rows exist; None when Postgres cannot be asked within the bound."""
    deadline = time.monotonic() + CONFIRM_COMMIT_S
    engine = session.get_bind()
    while True:
        try:
            with engine.connect() as connection:
                found = connection.scalar(
                    select(func.count()).select_from(Job).where(Job.id.in_(job_ids))
                )
            return found == len(job_ids)
        except (OperationalError, PoolTimeout) as exc:
            if time.monotonic() + CONFIRM_RETRY_S > deadline:
                log.warning("commit outcome unknown", jobs=len(job_ids), error=str(exc))
                return None
            time.sleep(CONFIRM_RETRY_S)


def _after_commit(job: Job, placement: Placement, *, counted: bool) -> None:
    """Send, count and log a stored job. The job is the client's now: a failure here is
    logged, never raised (the reconciler sends a job whose send failed)."""
    try:
        if counted:
            (CACHE_HITS if placement is Placement.CACHED else CACHE_MISSES).labels(job.model).inc()
        if placement is Placement.QUEUED:
            send_soon(
                job_queries.Delivery(job.id, job.kind, job.queue, job.priority, job.trace_context)
            )
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
    except Exception:
        log.exception("after storing a job", job_id=str(job.id))


def cache_fingerprint(
    spec: ModelSpec, queue: str, prompt: str, params: SamplingParams
) -> Fingerprint | None:
    """The request's completion-cache key; None when it may not use the cache (the cache is
    off, the request is sampled without a seed, asks for log-probabilities, which the cache
    does not keep, or the model's weights cannot be told apart)."""
    settings = get_settings()
    if not settings.cache or not is_deterministic(params) or params.wants_logprobs:
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
        return job_queries.insert_job(session, new), Placement.QUEUED
    ttl_s = get_settings().cache_ttl_s
    price = get_price_book().price(new.model)  # a hit finishes now, at the price in force now
    if (hit := cache_queries.answer_from_cache(session, key, new, ttl_s, price)) is not None:
        return hit, Placement.CACHED
    cache_queries.lock_key(session, key.cache_key)
    leader = cache_queries.find_leader(session, key.cache_key, new.priority)
    if leader is not None:
        follower = replace(new, follows_job_id=leader)
        return job_queries.insert_job(session, follower), Placement.FOLLOWING
    # The leader may have finished between the first look and the lock.
    if (hit := cache_queries.answer_from_cache(session, key, new, ttl_s, price)) is not None:
        return hit, Placement.CACHED
    return job_queries.insert_job(session, new), Placement.QUEUED
