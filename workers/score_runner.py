"""Scoring jobs' life inside a worker: claim them in Postgres, score them in the engine (see
workers/scoring.py), store the log-likelihoods. The twin of workers/runner.py for `llmq.score`
(one job) and `llmq.score_group` (several evaluation items in one message: one claim and one
result transaction for all of them, while each job still succeeds or fails on its own).
"""

import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from pydantic import ValidationError

from db.queries import jobs as job_queries
from db.session import session_scope
from llmq import tracing
from llmq.price_book import get_price_book
from llmq.protocol import ErrorCategory, ScoreInput, ScoreParams
from workers.db_retry import db_retry
from workers.engine_jobs import EngineStopped, JobFailed, ScoreOutput, ScoreRequest, ScoreTimeout
from workers.job_trace import JobTrace
from workers.pairs import PairEncoder
from workers.runner import STALL_GRACE_S

if TYPE_CHECKING:  # the model's modules import torch, which a remote model's worker never loads
    from workers.engine import GenerationEngine
    from workers.host import ModelHost

log = structlog.get_logger(__name__)


@dataclass
class _Scoring:
    """A claimed job handed to the engine."""

    job_id: uuid.UUID
    given: ScoreInput
    future: Future
    wait_until: float  # time.monotonic(): its deadline plus a grace for a stalled engine
    trace: JobTrace | None = None  # its spans, when it is traced
    error: str | None = None  # why it failed, for its trace
    submitted_ns: int = 0  # traced: when it went to the engine, and when the engine was done
    scored_ns: int = 0


@dataclass
class ScoreRunner:
    """Scoring jobs' life in a worker: claim them, score them in the engine, store outcomes."""

    engine: "GenerationEngine"  # or a remote model's engine (workers/remote/engine.py)
    host: "ModelHost"  # what it needs of it: the tokenizer
    database_url: str
    worker_name: str
    job_timeout_s: float

    def __post_init__(self) -> None:
        self.encoder = PairEncoder(self.host.tokenizer)

    def run(self, job_id: uuid.UUID) -> int:
        return self.run_group([job_id])

    def run_group(self, job_ids: list[uuid.UUID]) -> int:
        """Every job of the group ends stored, failed, skipped or handed back to the queue (its
        model was unloaded under it) before this returns; returns how many were handed back
        (their message must go back to the queue)."""
        traced = tracing.enabled()
        claim_started_ns = time.time_ns() if traced else 0
        claimed = self._claim(job_ids)
        claimed_ns = time.time_ns() if traced else 0
        skipped = set(job_ids) - {job.id for job in claimed}
        for job_id in skipped:
            log.info(
                "job skipped: cancelled, finished or held by another worker", job_id=str(job_id)
            )
        # All go to the engine before any is waited on, so they share its scoring passes.
        scoring = [s for job in claimed if (s := self._submit(job, claim_started_ns, claimed_ns))]
        outputs = [(s, output) for s in scoring if (output := self._wait(s)) is not None]
        if outputs:
            store_started_ns = time.time_ns() if traced else 0
            self._store(outputs)
            for s, _ in outputs:
                if s.trace is not None:
                    s.trace.child("llmq.result.write", store_started_ns, time.time_ns())
        stopped = [s.job_id for s in scoring if _engine_stopped(s.future)]
        for s in scoring:
            if s.trace is not None:
                if s.scored_ns:
                    pairs = {"llmq.pairs": len(s.given.continuations)}
                    s.trace.child("llmq.engine.score", s.submitted_ns, s.scored_ns, **pairs)
                handed_back = s.job_id in stopped
                s.trace.end("handed back: its model was unloaded" if handed_back else s.error)
        return len(self._hand_back(stopped)) if stopped else 0

    @db_retry
    def _hand_back(self, job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
        with session_scope(self.database_url) as session:
            return job_queries.hand_back(session, job_ids, self.worker_name)

    def _submit(self, job, claim_started_ns: int, claimed_ns: int) -> _Scoring | None:
        """Hand a claimed job (db.tables.Job) to the engine."""
        trace = JobTrace.begin(job, claim_started_ns, claimed_ns) if claimed_ns else None
        timeout_s = job.timeout_s or self.job_timeout_s
        try:
            given = ScoreInput.model_validate(job.input)
            params = ScoreParams.model_validate(job.params)
            pairs = self.encoder.pairs(given.prompt, given.continuations)
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            log.warning("job input rejected", job_id=str(job.id), error=str(exc))
            self._fail(job.id, ErrorCategory.INVALID_INPUT, f"{type(exc).__name__}: {exc}")
            if trace is not None:
                trace.end(ErrorCategory.INVALID_INPUT.value)
            return None
        deadline = time.monotonic() + timeout_s
        request = ScoreRequest(
            job.id,
            pairs,
            params.max_length,
            deadline,
            job.priority,
            trace_context=trace.traceparent() if trace is not None else None,
        )
        submitted_ns = time.time_ns() if trace is not None else 0
        future = self.engine.submit_score(request)
        wait_until = deadline + STALL_GRACE_S
        scoring = _Scoring(job.id, given, future, wait_until, trace, submitted_ns=submitted_ns)
        if trace is not None:  # only the time here: run_group makes the span, off this thread
            future.add_done_callback(lambda _: setattr(scoring, "scored_ns", time.time_ns()))
        return scoring

    def _wait(self, scoring: _Scoring) -> ScoreOutput | None:
        """The job's output, or None once its failure is stored."""
        try:
            return scoring.future.result(timeout=max(0.0, scoring.wait_until - time.monotonic()))
        except EngineStopped:
            return None  # its model was unloaded under it: handed back (run_group)
        except (ScoreTimeout, FutureTimeout) as exc:
            message = str(exc) or "no result within the deadline"
            self._failed(scoring, ErrorCategory.TIMEOUT, message)
        except JobFailed as exc:  # a remote model's upstream failure, with its category
            log.warning("job failed", job_id=str(scoring.job_id), error=str(exc))
            self._failed(scoring, exc.category, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("job input rejected", job_id=str(scoring.job_id), error=str(exc))
            message = f"{type(exc).__name__}: {exc}"
            self._failed(scoring, ErrorCategory.INVALID_INPUT, message)
        except Exception as exc:
            log.exception("job failed in the model", job_id=str(scoring.job_id))
            self._failed(scoring, ErrorCategory.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
        return None

    def _store(self, outputs: list[tuple[_Scoring, ScoreOutput]]) -> None:
        """All results in one transaction; if Postgres refuses it, each alone, so one bad
        result fails its own job only."""
        try:
            self._complete(outputs)
            return
        except Exception as exc:  # a result Postgres refuses must not leave the job running
            if len(outputs) == 1:
                scoring = outputs[0][0]
                log.exception("result could not be stored", job_id=str(scoring.job_id))
                self._failed(scoring, ErrorCategory.INTERNAL, f"result not stored: {exc}")
                return
            log.exception("results could not be stored together; storing each alone")
        for pair in outputs:
            self._store([pair])

    @db_retry
    def _claim(self, job_ids: list[uuid.UUID]) -> list:  # -> list[db.tables.Job]
        with session_scope(self.database_url) as session:
            return job_queries.claim_jobs(session, job_ids, self.worker_name)

    @db_retry
    def _complete(self, outputs: list[tuple[_Scoring, ScoreOutput]]) -> None:
        """The group's results, usage and scores in one transaction of four statements."""
        outcomes = {}
        for scoring, output in outputs:
            scores = output.loglikelihoods
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))
            outcomes[scoring.job_id] = job_queries.Outcome(
                text=scoring.given.continuations[best],  # the likeliest, shown as the result
                finish_reason="stop",
                prompt_tokens=output.input_tokens,
                completion_tokens=0,
                time_to_first_token_ms=None,
                duration_ms=output.duration_ms,
            )
        price_of = get_price_book().price  # the price in force as the jobs finish
        with session_scope(self.database_url) as session:
            done = job_queries.complete_jobs(session, self.worker_name, outcomes, price_of=price_of)
            scores = []
            for scoring, output in outputs:
                if scoring.job_id not in done:
                    log.warning(
                        "result dropped: the job was cancelled or handed to another worker",
                        job_id=str(scoring.job_id),
                    )
                    continue
                scores.append(
                    {
                        "job_id": scoring.job_id,
                        "loglikelihoods": output.loglikelihoods,
                        "greedy": output.greedy,
                    }
                )
            job_queries.store_score_results(session, scores)

    def _failed(self, scoring: _Scoring, category: ErrorCategory, message: str) -> None:
        scoring.error = message
        self._fail(scoring.job_id, category, message)

    @db_retry
    def _fail(self, job_id: uuid.UUID, category: ErrorCategory, message: str) -> None:
        with session_scope(self.database_url) as session:
            job_queries.fail_job(session, job_id, self.worker_name, category.value, message)


def _engine_stopped(future: Future) -> bool:
    return future.done() and isinstance(future.exception(), EngineStopped)
