"""One job's life inside a worker: claim it in Postgres, run it in the engine, store the outcome.

This is the boundary where a job's errors are caught, categorised and written; the Celery task
that calls it stays a thin adapter.
"""

import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import structlog

from db.queries import cache as cache_queries
from db.queries import jobs as job_queries
from db.session import session_scope
from llmq import metrics as outcomes
from llmq.events import DoneEvent, ErrorEvent, TokenEvent
from llmq.protocol import ErrorCategory, FinishReason, JobStatus, SamplingParams
from llmq.publisher import TokenEmission, TokenPublisher
from workers import metrics as worker_metrics
from workers.db_retry import db_retry
from workers.engine import GenerationEngine, GenerationOutput, GenerationRequest, JobTimeout
from workers.host import ModelHost
from workers.result_writer import ResultWriter

log = structlog.get_logger(__name__)

STALL_GRACE_S = 30.0


@dataclass
class JobRunner:
    engine: GenerationEngine
    host: ModelHost
    publisher: TokenPublisher
    database_url: str
    worker_name: str
    job_timeout_s: float
    results: ResultWriter

    def run(self, job_id: uuid.UUID) -> None:
        bound = log.bind(job_id=str(job_id), model=self.host.spec.id)
        job = self._claim(job_id)
        if job is None:
            bound.info("job skipped: cancelled or already finished")
            return
        if job_id in self.engine.active_job_ids():
            # This worker was presumed lost while it ran the job, and got it back: the run in
            # progress stores the result.
            bound.info("job already running in this worker")
            return
        if job.attempts > 1:  # a redelivery: the lost attempt's partial stream is void
            self.publisher.reset(job_id)
        try:
            params = SamplingParams.model_validate(job.params)
            prompt_ids = params.truncate_prompt(self.host.encode(job.input["prompt"]))
            timeout_s = job.timeout_s or self.job_timeout_s
            deadline = time.monotonic() + timeout_s
            request = GenerationRequest(job_id, prompt_ids, params, deadline, job.priority)
            future = self.engine.submit(request)
            # The engine enforces the deadline at each step; if it stops stepping at all, the
            # job must still end, so wait a little longer than the deadline and no more.
            output = future.result(timeout=timeout_s + STALL_GRACE_S)
        except JobTimeout as exc:
            self._fail(job_id, ErrorCategory.TIMEOUT, str(exc))
        except FutureTimeout:
            bound.error("the engine made no progress past the job's deadline")
            self.engine.cancel(job_id)
            message = f"the worker made no progress within {timeout_s + STALL_GRACE_S:.0f}s"
            self._fail(job_id, ErrorCategory.TIMEOUT, message)
        except (ValueError, KeyError, TypeError) as exc:
            bound.warning("job input rejected", error=str(exc))
            self._fail(job_id, ErrorCategory.INVALID_INPUT, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            bound.exception("job failed in the model")
            self._fail(job_id, ErrorCategory.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
        else:
            if output.finish_reason is FinishReason.CANCELLED:
                bound.info("job cancelled while running")
                self._publish_done(job_id, output, JobStatus.CANCELLED)
                return
            try:
                followers = self._complete(job_id, output)
            except Exception as exc:  # a result Postgres refuses must not leave the job running
                bound.exception("result could not be stored")
                self._fail(job_id, ErrorCategory.INTERNAL, f"result not stored: {exc}")
                return
            if followers is None:
                bound.warning("result dropped: the job was cancelled or handed to another worker")
                if self._was_cancelled(job_id):  # cancelled as it finished: tell its streams
                    self._publish_done(job_id, output, JobStatus.CANCELLED)
                return
            self._publish_done(job_id, output, JobStatus.SUCCEEDED)
            self._publish_followers_done(followers, output)
            bound.info(
                "job succeeded",
                completion_tokens=output.completion_tokens,
                duration_ms=round(output.duration_ms, 1),
                followers=len(followers),
            )

    @db_retry
    def _claim(self, job_id: uuid.UUID):  # -> db.tables.Job | None
        with session_scope(self.database_url) as session:
            job = job_queries.claim_job(session, job_id, self.worker_name)
        if job is not None:
            structlog.contextvars.bind_contextvars(request_id=job.request_id)
            worker_metrics.job_started(job)
        return job

    def _complete(self, job_id: uuid.UUID, output: GenerationOutput) -> list[uuid.UUID] | None:
        """Store the result, its cache entry and the results of the jobs that follow it, in one
        transaction (shared with other jobs finishing at the same time). Returns the followers'
        ids; None if the job was not this worker's."""
        outcome = job_queries.Outcome(
            text=output.text,
            finish_reason=output.finish_reason.value,
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            time_to_first_token_ms=output.time_to_first_token_ms,
            duration_ms=output.duration_ms,
        )
        stored = self.results.store(job_id, outcome)
        if stored is None:
            return None
        worker_metrics.job_succeeded(job_id, output)
        outcomes.job_finished(stored.job.model, JobStatus.SUCCEEDED.value, len(stored.followers))
        return stored.followers

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

    def _publish_done(self, job_id: uuid.UUID, output: GenerationOutput, status: JobStatus):
        event = DoneEvent(
            job_id=job_id,
            status=status.value,
            finish_reason=output.finish_reason.value,
            text=output.text,
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
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
