"""The job API: submit, read, list and cancel generation jobs."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, SessionDep, database_slots
from api.http.auth import Caller
from api.http.limits import admit
from api.http.middleware import request_id_of
from api.intake.openai_requests import checks_inline
from api.intake.submit import (
    GenerationRequest,
    Submission,
    resolve_model,
    submit_generations,
)
from api.results.events import StreamedEvent
from api.schemas.jobs import JobCreate, JobPublic, JobsPublic
from api.schemas.output_formats import resolve_named_schema
from db.queries import jobs as job_queries
from db.session import get_sessionmaker
from db.tables import Job
from llmq.errors import InvalidRequest, JobNotCancellable, JobNotFound
from llmq.events import DoneEvent
from llmq.metrics import job_finished
from llmq.protocol import JobStatus, SamplingParams

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# The longest a read may wait for its job to end: below common proxies' idle timeouts.
MAX_WAIT_S = 60.0

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def sampling_params(body: JobCreate, defaults) -> SamplingParams:
    max_tokens = body.max_tokens if body.max_tokens is not None else defaults.max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        **body.extra_sampling(max_tokens),
    )


def public_job(request: Request, job: Job) -> JobPublic:
    """The job as answered, its stored log-probabilities' tokens as text."""
    texts = None
    if job.result is not None and job.result.logprobs is not None:
        state = request.app.state
        spec = state.registry.get(job.model)
        texts = state.prompt_counter.token_texts(spec) if spec is not None else None
    return JobPublic.from_row(job, texts)


def job_timeout(requested: float | None, limit_s: float) -> float | None:
    if requested is not None and requested > limit_s:
        raise InvalidRequest(
            f"timeout_s is {requested:g}; this server runs a job for at most {limit_s:g} seconds",
            param="timeout_s",
        )
    return requested


def get_job_of(session, caller: Caller, job_id: uuid.UUID) -> Job:
    """The job, in the session, if the caller may see it."""
    return _visible(job_queries.get_job(session, job_id), caller, job_id)


def _visible(job: Job | None, caller: Caller, job_id: uuid.UUID) -> Job:
    """The job if the caller may see it: another key's job is 404, as if it did not exist."""
    if job is None or not caller.can_see(job.owner):
        raise JobNotFound(job_id)
    return job


def cancelled_event(job_id: uuid.UUID) -> DoneEvent:
    return DoneEvent(
        job_id=job_id,
        status=JobStatus.CANCELLED.value,
        finish_reason="cancelled",
        text="",
        prompt_tokens=0,
        completion_tokens=0,
    )


def _wait_query(what: str):
    return Query(
        ge=0,
        le=MAX_WAIT_S,
        description=f"Seconds to wait for the job to end before answering (long polling): {what} "
        "comes as soon as it has ended, or after `wait` seconds with the job as it is then. "
        "0 answers at once.",
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {
            "model": JobPublic,
            "description": "A job was submitted with this Idempotency-Key before: that job, as "
            "it is now; nothing new is queued",
        }
    },
)
async def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    caller: ApiKeyDep,
    idempotency_key: IdempotencyKey = None,
    wait: Annotated[float, _wait_query("the answer, with its result,")] = 0,
) -> JobPublic:
    """Accept a generation job: it is stored, then queued for a worker of its model. A
    deterministic job may come back succeeded at once, answered from the completion cache.
    With `wait`, the answer comes when the job has ended (one request instead of a submit and a
    long-polling read); the status code stays 202 for a new job either way."""
    # The app's parts are read from its state, not declared as dependencies: FastAPI's solving
    # of them, with the API key's check, took a fifth of this busy route's time on the GIL.
    state = request.app.state
    spec = resolve_model(state.registry, body.model)
    counter, settings = state.prompt_counter, state.settings

    def job_request(given: JobCreate, prompt: str, **counted) -> GenerationRequest:
        return GenerationRequest(
            spec=spec,
            prompt=prompt,
            params=sampling_params(given, spec.defaults),
            idempotency_key=idempotency_key,
            owner=caller.owner,
            request_id=request_id_of(request),
            timeout_s=job_timeout(body.timeout_s or spec.timeout_s, settings.job_time_limit_s),
            use_cache=body.cache,
            **counted,
        )

    def store() -> Submission:
        """In a thread, with a session of its own."""
        counter.check_token_ids(spec, body.token_ids_used())
        with get_sessionmaker(settings.database_url)() as session:
            given = resolve_named_schema(session, caller.owner, body)
            token_ids = body.prompt if isinstance(body.prompt, list) else None
            prompt = body.prompt if token_ids is None else counter.decode(spec, token_ids)
            admit(session, caller.owner, caller.limits, jobs=1)
            job = job_request(given, prompt, prompt_token_ids=token_ids)
            return submit_generations(session, [job], counter, state.live_queues)[0]

    async def store_with_others() -> Submission:
        counter.check_token_ids(spec, body.token_ids_used())
        job = job_request(body, body.prompt, prompt_tokens=counter.count(spec, body.prompt))
        [submission] = await state.store_groups.store([job], caller.owner, caller.limits)
        return submission

    slot = await database_slots(request).acquire()
    since = state.event_reader.mark()
    try:  # the database slot is given back before any wait
        if idempotency_key is None and _checked_inline(body):
            submission = await store_with_others()
        else:
            submission = await run_in_threadpool(store)
    finally:
        slot.release()
    job, created = submission.job, submission.created
    # A job to wait for is answered after the wait: nothing to build now.
    public = None if wait > 0 and not JobStatus(job.status).is_final else public_job(request, job)
    if not created:
        response.status_code = status.HTTP_200_OK
    if public is None:
        final = await state.event_reader.wait_final(job.id, wait, since=since if created else None)
        public = await _answer_after_wait(request, caller, job, final)
    return public


def _checked_inline(body: JobCreate) -> bool:
    """Whether the job is checked on the event loop and stored with the requests beside it
    (api/intake/store_groups.py): a short text prompt, no constraint to compile, no stored
    schema to read. Others take a thread and a transaction of their own, as does a request
    with an Idempotency-Key."""
    return checks_inline([body.prompt], body)


@router.get("/{job_id}", response_model=JobPublic)
async def read_job(
    job_id: uuid.UUID,
    request: Request,
    caller: ApiKeyDep,
    wait: Annotated[float, _wait_query("the answer")] = 0,
) -> JobPublic:
    """A job with its status and, once finished, its result or error."""
    job = await _read_job(request, caller, job_id)
    if wait > 0 and not JobStatus(job.status).is_final:
        final = await request.app.state.event_reader.wait_final(job_id, wait)
        return await _answer_after_wait(request, caller, job, final)
    return public_job(request, job)


async def _answer_after_wait(
    request: Request, caller: Caller, job: Job, final: StreamedEvent | None
) -> JobPublic:
    """A job the request waited for, as a read shows it now. The final event of the worker
    that stored the job tells that without a read; any other end (a failure, a cancellation,
    a follower's, an event seen only in Postgres) or none yet is read back."""
    if final is not None and final.type == "done":
        public = JobPublic.from_done_event(job, DoneEvent.model_validate_json(final.data))
        if public is not None:
            return public
    return public_job(request, await _read_job(request, caller, job.id))


async def _read_job(request: Request, caller: Caller, job_id: uuid.UUID) -> Job:
    """The job, read in a thread once the request has its turn at the database."""
    slot = await database_slots(request).acquire()
    try:
        return await run_in_threadpool(
            _load_job, request.app.state.settings.database_url, caller, job_id
        )
    finally:
        slot.release()


def _load_job(database_url: str, caller: Caller, job_id: uuid.UUID) -> Job:
    with get_sessionmaker(database_url)() as session:
        return _visible(job_queries.read_job(session, job_id), caller, job_id)


@router.get("", response_model=JobsPublic)
def list_jobs(
    request: Request,
    session: SessionDep,
    caller: ApiKeyDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobsPublic:
    """The key's jobs (an admin's: everyone's), newest first, filtered by status and model."""
    rows, total = job_queries.list_jobs(
        session,
        status=status_filter.value if status_filter else None,
        model=model,
        limit=limit,
        offset=offset,
        owner=caller.sees_only,
    )
    return JobsPublic(
        data=[public_job(request, j) for j in rows], total=total, limit=limit, offset=offset
    )


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(
    job_id: uuid.UUID, session: SessionDep, request: Request, caller: ApiKeyDep
) -> JobPublic:
    """Cancel a queued job (it never runs) or a running one (it leaves its batch)."""
    job = get_job_of(session, caller, job_id)
    never_started = job.status == JobStatus.QUEUED.value
    cancelled = job_queries.cancel_job(session, job_id)
    session.commit()
    session.refresh(job)
    if cancelled:
        job_finished(job.model, JobStatus.CANCELLED.value)
    if cancelled and never_started:  # a running job's worker announces its own end
        request.app.state.publisher.publish_final(job_id, cancelled_event(job_id))
    if not cancelled and job.status != JobStatus.CANCELLED.value:
        raise JobNotCancellable(
            f"job {job_id} already {job.status}; only queued or running jobs can be cancelled"
        )
    return JobPublic.from_row(job)
