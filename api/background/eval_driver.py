"""Moves evaluation runs forward: plans their items, keeps a window of their jobs on the queue,
grades the items whose jobs have ended, and finishes runs once every item is graded.

Everything it knows it reads from Postgres each sweep, so any API process can drive any run,
and a run survives restarts: a run caught mid-plan is planned again (the plan is one
transaction), jobs lost with a worker are requeued by the reconciler, and finished items are
never redone. Two processes never feed one run at once: feeding locks the run's row.

Items are background jobs (BATCH_PRIORITY): in the workers they run in the background lane, so
a run does not slow interactive jobs down, and they are released within the model's background
window (api/background/window.py), shared with the Batch API, rather than all at once: an
MMLU run is 14,042 jobs; sent together they would hold every Celery thread of the model's
workers, and a cancelled run would leave thousands of messages behind.
"""

import sys
import time
import uuid

import structlog

from api.background.window import background_room
from api.fleet.live_workers import LiveQueues
from api.http.limits import job_room, limits_of
from api.intake.enqueue import enqueue_job, enqueue_score_group, route
from api.intake.prompts import PromptCounter
from db.queries import evals as eval_queries
from db.queries import jobs as job_queries
from db.queries import keys as key_queries
from db.session import session_scope
from llmq.errors import LlmqError, QuotaExceeded
from llmq.evals.datasets import resolve_dataset
from llmq.evals.grading import grade_generation, grade_scores
from llmq.evals.planning import Benchmark, ModelFacts, RunSettings, plan
from llmq.evals.summary import summarize
from llmq.periodic import PeriodicTask
from llmq.protocol import BATCH_PRIORITY, JobKind
from llmq.registry import Registry
from llmq.settings import Settings
from llmq.tracing import collection_trace, linked_trace

log = structlog.get_logger(__name__)

GRADE_PAGE = 2000
# Scoring items (MMLU) go out this many to a message: one claim and one result transaction in
# the worker for all of them instead of one each. Sent one to a message, a stories260K item's
# message, claim and completion cost about two thirds of the CPU of its forward passes.
SCORE_GROUP_SIZE = 16


class EvalDriver:
    def __init__(
        self, settings: Settings, registry: Registry, counter: PromptCounter, live: LiveQueues
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.counter = counter
        self.live = live
        self._sweeper = PeriodicTask(
            "llmq-eval-driver",
            settings.eval_interval_s,
            self._sweep,
            idle_interval_s=settings.background_idle_interval_s,
        )

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()

    def wake(self) -> None:
        """Sweep now: a run was created or cancelled."""
        self._sweeper.wake()

    def sweep(self) -> bool:
        """Advance every open run; False when there was none."""
        url = self.settings.database_url
        with session_scope(url) as session:
            queued = eval_queries.runs_with_status(session, eval_queries.RunStatus.QUEUED)
            running = eval_queries.runs_with_status(session, eval_queries.RunStatus.RUNNING)
        for run_id in queued:
            self.plan(run_id)
        for run_id in running:
            self.grade(run_id)
            self.feed(run_id)
            self.finish_if_done(run_id)
        return bool(queued or running)

    def plan(self, run_id: uuid.UUID) -> None:
        with session_scope(self.settings.database_url) as session:
            run = eval_queries.lock_run(session, run_id, eval_queries.RunStatus.QUEUED)
            if run is None:
                return
            spec = self.registry.get(run.model)
            if spec is None:
                eval_queries.fail_run(session, run_id, f"model {run.model!r} is not served here")
                return
            facts = ModelFacts(
                spec.id, spec.source, spec.context_length, self.counter.eos_text(spec)
            )
            try:
                # Resolved again under the API's rules, so a run stored before one of them
                # existed still reads nothing outside the data directory.
                dataset = resolve_dataset(run.benchmark, run.dataset, self.settings.eval_data_root)
                settings = RunSettings(
                    Benchmark(run.benchmark), run.num_fewshot, run.limit, run.subjects, dataset
                )
                items = plan(settings, facts)
            except LlmqError as exc:
                log.warning("evaluation run could not start", run_id=str(run_id), error=str(exc))
                eval_queries.fail_run(session, run_id, exc.message)
                return
            except Exception as exc:  # a bug: fail the run, not each sweep
                log.exception("evaluation run could not be planned", run_id=str(run_id))
                # The run's owner reads this; the exception's text may name server paths.
                eval_queries.fail_run(
                    session,
                    run_id,
                    f"the run could not be planned ({type(exc).__name__}); the API's log has "
                    "the details",
                )
                return
            new_items = [
                eval_queries.NewItem(
                    position,
                    item.task,
                    item.doc_index,
                    item.kind.value,
                    item.input,
                    item.params,
                    item.request_key(facts),
                    item.gold,
                )
                for position, item in enumerate(items)
            ]
            reused = eval_queries.store_plan(session, run, new_items)
        log.info("evaluation run planned", run_id=str(run_id), items=len(items), reused=reused)

    def feed(self, run_id: uuid.UUID) -> int:
        """Top the run's jobs in flight up to its window; returns how many were sent."""
        with session_scope(self.settings.database_url) as session:
            run = eval_queries.lock_run(session, run_id, eval_queries.RunStatus.RUNNING)
            if run is None:
                return 0
            spec = self.registry.get(run.model)
            if spec is None:
                eval_queries.fail_run(session, run_id, f"model {run.model!r} is not served here")
                return 0
            room = background_room(session, self.registry, self.live)[spec.id]
            if self.settings.eval_jobs_in_flight:
                cap = self.settings.eval_jobs_in_flight
                room = min(room, cap - eval_queries.in_flight_jobs(session, run_id))
            if run.owner is not None:
                room = min(room, self._key_room(session, run))
            if room <= 0:
                return 0
            queue = route(spec, self.live.queues)
            # The run is one trace; each of its jobs gets its own, linked to it. The jobs go
            # in one statement, and their items are assigned in another.
            items = eval_queries.next_requests(session, run_id, room)
            new_jobs = []
            with collection_trace("llmq.eval.feed", run_id, **{"llmq.run_id": str(run_id)}) as feed:
                for item in items:
                    with linked_trace("llmq.eval.item", feed) as trace_context:
                        new_jobs.append(
                            job_queries.NewJob(
                                kind=item.kind,
                                model=spec.id,
                                queue=queue,
                                input=item.input,
                                params=item.params,
                                owner=run.owner or f"eval:{run_id}",
                                timeout_s=spec.timeout_s,
                                priority=BATCH_PRIORITY,
                                trace_context=trace_context,
                            )
                        )
                job_ids = job_queries.insert_job_ids(session, new_jobs)
                eval_queries.assign_jobs(
                    session,
                    run_id,
                    [
                        (item.request_key, job_id)
                        for item, job_id in zip(items, job_ids, strict=True)
                    ],
                )
            created = [  # (id, kind, trace), one queue
                (job_id, new.kind, new.trace_context)
                for job_id, new in zip(job_ids, new_jobs, strict=True)
            ]
        # After the commit, as for every job; a lost send is resent by the reconciler, job by job.
        scoring = [job_id for job_id, kind, _ in created if kind == JobKind.SCORE.value]
        for start in range(0, len(scoring), SCORE_GROUP_SIZE):
            enqueue_score_group(scoring[start : start + SCORE_GROUP_SIZE], queue, BATCH_PRIORITY)
        for job_id, kind, trace_context in created:
            if kind != JobKind.SCORE.value:
                enqueue_job(job_id, kind, queue, BATCH_PRIORITY, trace_context)
        return len(created)

    def _key_room(self, session, run) -> int:
        """The jobs that the run's API key may still add: its jobs count toward the key's
        concurrent jobs. Once the key's monthly tokens are spent, the run fails."""
        key = key_queries.get_key(session, uuid.UUID(run.owner))
        if key is None:
            return sys.maxsize
        try:
            room = job_room(session, run.owner, limits_of(key, self.settings))
        except QuotaExceeded as exc:
            eval_queries.fail_run(session, run.id, exc.message)
            log.info("evaluation run stopped: quota spent", run_id=str(run.id))
            return 0
        return sys.maxsize if room is None else room

    def grade(self, run_id: uuid.UUID) -> int:
        """Grade the run's items whose jobs have ended; returns how many."""
        total = 0
        while True:
            with session_scope(self.settings.database_url) as session:
                finished = eval_queries.finished_items(session, run_id, GRADE_PAGE)
                grades = []
                for item in finished:
                    grade = {"id": item.item_id, "output": None, "details": None, "metrics": None}
                    if item.error is not None:
                        grades.append(grade | {"error": item.error})
                        continue
                    if item.kind == JobKind.SCORE.value:
                        result = grade_scores(item.loglikelihoods or [], item.gold)
                    else:
                        result = grade_generation(item.text or "", item.gold)
                    grades.append(
                        grade
                        | {
                            "output": result.output,
                            "details": result.details,
                            "metrics": result.metrics,
                            "error": None,
                        }
                    )
                eval_queries.store_grades(session, grades)
            total += len(finished)
            if len(finished) < GRADE_PAGE:
                return total

    def finish_if_done(self, run_id: uuid.UUID) -> None:
        with session_scope(self.settings.database_url) as session:
            run = eval_queries.get_run(session, run_id)
            if run is None or run.status != eval_queries.RunStatus.RUNNING:
                return
            if eval_queries.has_ungraded(session, run_id):
                return
            progress = eval_queries.progress(session, run_id, run.total)
            scores = summarize(
                Benchmark(run.benchmark), eval_queries.graded_metrics(session, run_id)
            )
            # A score over fewer items than the benchmark is not the benchmark's score: say so.
            error = None
            if progress.failed:
                error = (
                    f"{progress.failed} of {run.total} items failed (their errors are in "
                    f"/v1/evals/{run_id}/items); the scores cover the other "
                    f"{run.total - progress.failed}"
                )
            if eval_queries.finish_run(session, run_id, scores, error):
                log.info(
                    "evaluation run finished",
                    run_id=str(run_id),
                    scores=scores["metrics"],
                    failed_items=progress.failed,
                )

    def _sweep(self) -> bool:
        started = time.monotonic()
        active = self.sweep()
        if time.monotonic() - started > 5:
            log.info("slow evaluation sweep", seconds=round(time.monotonic() - started, 1))
        return active
