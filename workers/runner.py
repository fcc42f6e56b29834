"""One job's life inside a worker: claim it in Postgres, run it in the engine, store the outcome.

This is the boundary where a job's errors are caught, categorised and written; the Celery task
that calls it stays a thin adapter.
"""

import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog

from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.session import session_scope
from llmq import metrics as outcomes
from llmq import tracing
from llmq.events import DoneEvent, ErrorEvent, JobEnding, TokenEvent
from llmq.protocol import (
    PROMPT_TOKEN_IDS_FIELD,
    ErrorCategory,
    FinishReason,
    JobStatus,
    SamplingParams,
)
from llmq.publisher import TokenEmission, TokenPublisher
from workers import metrics as worker_metrics
from workers.claimer import JobClaimer
from workers.db_retry import db_retry
from workers.engine_jobs import (
    EngineStopped,
    GenerationOutput,
    GenerationRequest,
    JobFailed,
    JobTimeout,
    ScoreOutput,
    ScoreRequest,
    ScoreTimeout,
)
from workers.job_trace import JobTrace
from workers.result_writer import ResultWriter

if TYPE_CHECKING:  # the model's modules import torch, which a remote model's worker never loads
    from workers.engine import GenerationEngine
    from workers.host import ModelHost

log = structlog.get_logger(__name__)

STALL_GRACE_S = 30.0


@dataclass
class JobRunner:
    engine: "GenerationEngine"
    host: "ModelHost"
    publisher: TokenPublisher
    database_url: str
    worker_name: str
    job_timeout_s: float
    results: ResultWriter

    def __post_init__(self) -> None:
        self.claims = JobClaimer(self.database_url, self.worker_name)
        self.claims.start()

    def stop(self) -> None:
        self.claims.stop()
        self.results.stop()

    def run(self, job_id: uuid.UUID) -> int:
        return self.run_group([job_id])

    def run_group(self, job_ids: list[uuid.UUID]) -> int:
        """Run jobs delivered in one message: claimed together, handed to the engine together,
        each stored and announced as soon as it finishes. Every job has ended (stored, failed,
        skipped, or handed back to the queue when its model was unloaded under it) when this
        returns; returns how many were handed back (their message must go back to the queue)."""
        traced = tracing.enabled()
        claim_started_ns = time.time_ns() if traced else 0
        claimed = self.claims.claim_all(job_ids)
        claimed_ns = time.time_ns() if traced else 0
        for job_id in set(job_ids) - {job.id for job in claimed}:
            log.info("job skipped: cancelled or already finished", job_id=str(job_id))
        running = dict(
            filter(None, (self._start(job, claim_started_ns, claimed_ns) for job in claimed))
        )
        storing: dict[Future, tuple[_Running, GenerationOutput]] = {}
        handed_back: list[uuid.UUID] = []
        while running or storing:
            deadline = min((r.wait_until for r in running.values()), default=None)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = wait([*running, *storing], timeout, return_when=FIRST_COMPLETED)
            for future in done:
                if future in running:
                    job = running.pop(future)
                    if isinstance(future.exception(), EngineStopped):
                        handed_back.append(job.job_id)
                        if job.trace is not None:
                            job.trace.end("handed back: its model was unloaded")
                        continue
                    output = self._ended(job, future)
                    if job.trace is not None:
                        job.trace.ended(output, future)
                    if output is not None:
                        storing[self.results.store_async(job.job_id, _outcome(output))] = (
                            job,
                            output,
                        )
                else:
                    self._stored(*storing.pop(future), future)
            for future, job in list(running.items()):
                if time.monotonic() >= job.wait_until:  # the engine stopped stepping
                    del running[future]
                    self._stalled(job)
        return len(self._hand_back(handed_back))

    @db_retry
    def _hand_back(self, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
        """Jobs whose engine stopped under them (their model was unloaded) go back to queued,
        untouched: not failed, so another run (here or on another worker) gives their result."""
        if not job_ids:
            return []
        with session_scope(self.database_url) as session:
            released = job_queries.hand_back(session, job_ids, self.worker_name)
        for job_id in released:
            log.info("job handed back to the queue: its model was unloaded", job_id=str(job_id))
        return released

    def _start(
        self, job, claim_started_ns: int = 0, claimed_ns: int = 0
    ) -> tuple[Future, "_Running"] | None:
        """Hand a claimed job to the engine."""
        bound = log.bind(job_id=str(job.id), model=self.host.spec.id, request_id=job.request_id)
        trace = JobTrace.begin(job, claim_started_ns, claimed_ns) if claimed_ns else None
        if trace is not None:
            bound = bound.bind(**trace.log_ids())
        worker_metrics.job_started(job)
        if job.id in self.engine.active_job_ids():
            # This worker was presumed lost while it ran the job, and got it back: the run in
            # progress stores the result.
            bound.info("job already running in this worker")
            if trace is not None:
                trace.end()
            return None
        if job.attempts > 1:  # a redelivery: the lost attempt's partial stream is void
            self.publisher.reset(job.id)
        timeout_s = job.timeout_s or self.job_timeout_s
        try:
            params = SamplingParams.model_validate(job.params)
            future = self._submit(job, params, time.monotonic() + timeout_s, trace)
        except (ValueError, KeyError, TypeError) as exc:
            bound.warning("job input rejected", error=str(exc))
            self._fail(job.id, ErrorCategory.INVALID_INPUT, f"{type(exc).__name__}: {exc}")
            if trace is not None:
                trace.end(ErrorCategory.INVALID_INPUT.value)
            return None
        # The engine enforces the deadline at each step; if it stops stepping at all, the job
        # must still end, so wait a little longer than the deadline and no more.
        wait_s = timeout_s + STALL_GRACE_S
        return future, _Running(job.id, wait_s, time.monotonic() + wait_s, bound, trace)

    def _prompt_ids(self, given: dict) -> list[int]:
        token_ids = given.get(PROMPT_TOKEN_IDS_FIELD)
        if token_ids is not None:
            return [int(token) for token in token_ids]
        return self.host.encode(given["prompt"])

    def _submit(
        self, job, params: SamplingParams, deadline: float, trace: JobTrace | None
    ) -> Future:
        """Hand the job to the engine: its generation, and with prompt_logprobs a scoring
        pass over its prompt, batched with other scoring work (max_tokens 0: that alone)."""
        prompt_ids = params.truncate_prompt(self._prompt_ids(job.input))
        generation = None
        if params.max_tokens > 0:
            request = GenerationRequest(
                job.id,
                prompt_ids,
                params,
                deadline,
                job.priority,
                timed=trace is not None,
                stream_tokens=job.stream_tokens,
            )
            generation = self.engine.submit(request)
        if params.prompt_logprobs is None:
            assert generation is not None, "max_tokens 0 needs prompt_logprobs"
            return generation
        scoring = None
        if len(prompt_ids) > 1:  # the first token has no log-probability
            pair = (prompt_ids[:1], prompt_ids[1:])
            request = ScoreRequest(
                job.id,
                [pair],
                len(prompt_ids),
                deadline,
                job.priority,
                top_logprobs=params.prompt_logprobs,
            )
            scoring = self.engine.submit_score(request)
        return with_prompt_logprobs(generation, scoring, prompt_ids)

    def _ended(self, job: "_Running", future: Future) -> GenerationOutput | None:
        """The output of a job the engine has finished, to be stored; None once its failure
        or cancellation has been told."""
        try:
            output = future.result()
        except JobTimeout as exc:
            self._fail(job.job_id, ErrorCategory.TIMEOUT, str(exc))
        except JobFailed as exc:
            job.bound.warning("job failed", category=exc.category.value, error=str(exc))
            self._fail(job.job_id, exc.category, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            job.bound.warning("job input rejected", error=str(exc))
            self._fail(job.job_id, ErrorCategory.INVALID_INPUT, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            job.bound.exception("job failed in the model")
            self._fail(job.job_id, ErrorCategory.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
        else:
            if output.finish_reason is not FinishReason.CANCELLED:
                return output
            job.bound.info("job cancelled while running")
            self._publish_done(job.job_id, output, JobStatus.CANCELLED)
        return None

    def _stalled(self, job: "_Running") -> None:
        job.bound.error("the engine made no progress past the job's deadline")
        self.engine.cancel(job.job_id)
        message = f"the worker made no progress within {job.wait_s:.0f}s"
        self._fail(job.job_id, ErrorCategory.TIMEOUT, message)
        if job.trace is not None:
            job.trace.end(message)

    def _stored(self, job: "_Running", output: GenerationOutput, future: Future) -> None:
        """Announce a stored result (or store the failure to store it)."""
        trace = job.trace
        if trace is not None:
            trace.stored(output.completion_tokens)
        try:
            stored = future.result()
        except Exception as exc:  # a result Postgres refuses must not leave the job running
            job.bound.exception("result could not be stored")
            self._fail(job.job_id, ErrorCategory.INTERNAL, f"result not stored: {exc}")
            if trace is not None:
                trace.end(f"result not stored: {exc}")
            return
        if stored is None:
            job.bound.warning("result dropped: the job was cancelled or handed to another worker")
            if self._was_cancelled(job.job_id):  # cancelled as it finished: tell its streams
                self._publish_done(job.job_id, output, JobStatus.CANCELLED)
            if trace is not None:
                trace.end()
            return
        worker_metrics.job_succeeded(job.job_id, output)
        outcomes.job_finished(stored.job.model, JobStatus.SUCCEEDED.value, len(stored.followers))
        publish_started_ns = time.time_ns() if trace is not None else 0
        self._publish_done(job.job_id, output, JobStatus.SUCCEEDED, _ending(stored.job, output))
        self._publish_followers_done(stored.followers, output)
        if trace is not None:
            trace.child("llmq.stream.publish", publish_started_ns, time.time_ns())
            trace.end()
        job.bound.info(
            "job succeeded",
            completion_tokens=output.completion_tokens,
            duration_ms=round(output.duration_ms, 1),
            followers=len(stored.followers),
        )

    @db_retry
    def _was_cancelled(self, job_id: uuid.UUID) -> bool:
        with session_scope(self.database_url) as session:
            return bool(job_queries.cancelled_among(session, [job_id]))

    def _fail(self, job_id: uuid.UUID, category: ErrorCategory, message: str) -> None:
        failed_followers = self._store_failure(job_id, category, message)
        if failed_followers is None:
            return  # cancelled, or handed to another worker: its outcome is not ours to tell
        for failed in (job_id, *failed_followers):
            event = ErrorEvent(job_id=failed, category=category.value, message=message)
            self.publisher.publish_final(failed, event)

    @db_retry
    def _store_failure(
        self, job_id: uuid.UUID, category: ErrorCategory, message: str
    ) -> list[uuid.UUID] | None:
        """Store the failure and settle the jobs that follow this one, in one transaction.
        Returns the followers that failed with it; None if the job was not this worker's."""
        with session_scope(self.database_url) as session:
            if not job_queries.fail_job(session, job_id, self.worker_name, category.value, message):
                return None
            failed_followers = cache_queries.settle_followers_of_failed(
                session, job_id, category.value, message
            )
        worker_metrics.job_failed(job_id, category.value)
        for _ in failed_followers:
            outcomes.job_failed(self.host.spec.id, category.value)
        return failed_followers

    def _publish_done(
        self,
        job_id: uuid.UUID,
        output: GenerationOutput,
        status: JobStatus,
        ending: JobEnding | None = None,
    ):
        event = DoneEvent(
            job_id=job_id,
            status=status.value,
            finish_reason=output.finish_reason.value,
            text=output.text,
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            logprobs=stored_logprobs(output),
            ending=ending,
        )
        self.publisher.publish_final(job_id, event)

    def _publish_followers_done(self, followers: list[uuid.UUID], output: GenerationOutput):
        """A follower's stream gets the whole text as one token event, then its end, as a
        stream rebuilt from Postgres would."""
        for follower in followers:
            if output.text:
                index = max(output.completion_tokens - 1, 0)
                token = TokenEvent(job_id=follower, token_index=index, text=output.text)
                self.publisher.publish_tokens([TokenEmission(1, token)])
            self._publish_done(follower, output, JobStatus.SUCCEEDED)


@dataclass(frozen=True)
class _Running:
    """A job in the engine."""

    job_id: uuid.UUID
    wait_s: float
    wait_until: float  # time.monotonic(): its deadline plus a grace for a stalled engine
    bound: structlog.stdlib.BoundLogger
    trace: JobTrace | None = None  # its spans, when it is traced


def _ending(job: job_queries.Completed, output: GenerationOutput) -> JobEnding | None:
    """The stored job's end as a read of it would show it (None when its usage row was not
    this completion's)."""
    if job.charge is None:
        return None
    return JobEnding(
        attempts=job.attempts,
        started_at=job.started_at,
        finished_at=job.finished_at,
        time_to_first_token_ms=output.time_to_first_token_ms,
        duration_ms=output.duration_ms,
        cost=job.charge.cost,
        currency=job.charge.currency,
    )


def _outcome(output: GenerationOutput) -> job_queries.Outcome:
    return job_queries.Outcome(
        text=output.text,
        finish_reason=output.finish_reason.value,
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        time_to_first_token_ms=output.time_to_first_token_ms,
        duration_ms=output.duration_ms,
        logprobs=stored_logprobs(output),
    )


def stored_logprobs(output: GenerationOutput) -> dict | None:
    """A job's log-probabilities as stored with its result and sent in its final event."""
    if output.logprobs is None and output.prompt_logprobs is None:
        return None
    return {"prompt": output.prompt_logprobs, "completion": output.logprobs}


def with_prompt_logprobs(
    generation: Future | None, scoring: Future | None, prompt_ids: list[int]
) -> Future:
    """One future for a job's generation (None: max_tokens 0) and its prompt's scoring pass
    (None: a one-token prompt), resolved when both are: the generation's output with the
    prompt's log-probabilities, or the first error (a scoring timeout as the job's timeout)."""
    joined: Future = Future()
    parts = [part for part in (generation, scoring) if part is not None]
    lock = threading.Lock()

    def settle(_: Future) -> None:
        with lock:
            if joined.done() or not all(part.done() for part in parts):
                return
            try:
                score: ScoreOutput | None = scoring.result() if scoring is not None else None
                if generation is not None:
                    output = generation.result()
                else:
                    duration = score.duration_ms if score is not None else 0.0
                    output = GenerationOutput(
                        "", FinishReason.LENGTH, len(prompt_ids), 0, None, duration
                    )
            except ScoreTimeout as exc:
                joined.set_exception(JobTimeout(str(exc)))
                return
            except BaseException as exc:
                joined.set_exception(exc)
                return
            prompt: list = [(prompt_ids[0], None, None)]  # nothing predicts the first token
            if score is not None and score.token_logprobs is not None:
                prompt += score.token_logprobs[0]
            joined.set_result(replace(output, prompt_logprobs=prompt))

    if not parts:
        settle(joined)
    for part in parts:
        part.add_done_callback(settle)
    return joined
