"""One scoring job's life inside a worker: claim it in Postgres, score it in the engine (see
workers/scoring.py), store the log-likelihoods. The twin of workers/runner.py for `llmq.score`.
"""

import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from db.queries import jobs as job_queries
from db.session import session_scope
from db.tables import ScoreResult
from llmq.protocol import ErrorCategory, ScoreInput, ScoreParams
from workers.engine import GenerationEngine
from workers.host import ModelHost
from workers.runner import STALL_GRACE_S, db_retry
from workers.scoring import PairEncoder, ScoreOutput, ScoreRequest, ScoreTimeout

log = structlog.get_logger(__name__)


@dataclass
class ScoreRunner:
    """One scoring job's life in a worker: claim it, score it in the engine, store the outcome."""

    engine: GenerationEngine
    host: ModelHost
    database_url: str
    worker_name: str
    job_timeout_s: float

    def __post_init__(self) -> None:
        self.encoder = PairEncoder(self.host.tokenizer)

    def run(self, job_id: uuid.UUID) -> None:
        bound = log.bind(job_id=str(job_id), model=self.host.spec.id)
        job = self._claim(job_id)
        if job is None:
            bound.info("job skipped: cancelled, finished or held by another worker")
            return
        timeout_s = job.timeout_s or self.job_timeout_s
        try:
            given = ScoreInput.model_validate(job.input)
            params = ScoreParams.model_validate(job.params)
            pairs = self.encoder.pairs(given.prompt, given.continuations)
            deadline = time.monotonic() + timeout_s
            request = ScoreRequest(job_id, pairs, params.max_length, deadline, job.priority)
            output = self.engine.submit_score(request).result(timeout=timeout_s + STALL_GRACE_S)
        except (ScoreTimeout, FutureTimeout) as exc:
            self._fail(job_id, ErrorCategory.TIMEOUT, str(exc) or "no result within the deadline")
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            bound.warning("job input rejected", error=str(exc))
            self._fail(job_id, ErrorCategory.INVALID_INPUT, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            bound.exception("job failed in the model")
            self._fail(job_id, ErrorCategory.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
        else:
            try:
                stored = self._complete(job_id, given, output)
            except Exception as exc:  # a result Postgres refuses must not leave the job running
                bound.exception("result could not be stored")
                self._fail(job_id, ErrorCategory.INTERNAL, f"result not stored: {exc}")
                return
            if not stored:
                bound.warning("result dropped: the job was cancelled or handed to another worker")

    @db_retry
    def _claim(self, job_id: uuid.UUID):  # -> db.tables.Job | None
        with session_scope(self.database_url) as session:
            return job_queries.claim_job(session, job_id, self.worker_name)

    @db_retry
    def _complete(self, job_id: uuid.UUID, given: ScoreInput, output: ScoreOutput) -> bool:
        best = max(range(len(output.loglikelihoods)), key=lambda i: (output.loglikelihoods[i], -i))
        outcome = job_queries.Outcome(
            text=given.continuations[best],  # the most likely continuation, shown as the result
            finish_reason="stop",
            prompt_tokens=output.input_tokens,
            completion_tokens=0,
            time_to_first_token_ms=None,
            duration_ms=output.duration_ms,
        )
        with session_scope(self.database_url) as session:
            if not job_queries.complete_job(session, job_id, self.worker_name, outcome):
                return False
            session.add(
                ScoreResult(
                    job_id=job_id, loglikelihoods=output.loglikelihoods, greedy=output.greedy
                )
            )
            return True

    @db_retry
    def _fail(self, job_id: uuid.UUID, category: ErrorCategory, message: str) -> None:
        with session_scope(self.database_url) as session:
            job_queries.fail_job(session, job_id, self.worker_name, category.value, message)
