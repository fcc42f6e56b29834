"""Requests that arrive together share one transaction, as a worker's finished jobs do.

Each request's jobs once took a thread hand-off, an INSERT and a COMMIT of their own: under
load about a fifth of the API's CPU a job and a commit a job in Postgres. StoreGroups keeps one
thread that takes every request waiting, admits each against its key's limits, stores the jobs
of all of them in one transaction (those that may meet the completion cache after their look
at it, as submit.py stores them; the others in one INSERT), commits once, sends them, then
answers each request on its event loop.

Nothing changes for the client: the commit still comes before the answer and before the send,
and an error before the commit fails only the requests it concerns: a refused key's request
alone; a value that Postgres refuses fails the group's INSERT, after which each request is
stored in a transaction of its own, so that only that one fails; Postgres away (an
OperationalError) fails every request of the group, none of whose jobs is stored, as it would
have failed each alone. A request with an Idempotency-Key keeps a transaction of its own
(submit.py), since a key that another request stored first rolls back its transaction.
"""

import asyncio
import contextvars
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

import structlog
from sqlalchemy.exc import OperationalError

from api.fleet.live_workers import LiveQueues
from api.http.limits import KeyLimits, admit
from api.intake.prompts import PromptCounter
from api.intake.submit import (
    GenerationRequest,
    PreparedJob,
    Submission,
    announce,
    commit_or_confirm,
    prepare_generations,
    store_prepared,
)
from db.session import get_sessionmaker
from llmq.tracing import current_traceparent, quiet, record_child, request_traced, tracer

log = structlog.get_logger(__name__)

# Jobs a transaction takes at most: a group is whatever waits when the last one commits, and a
# larger one would keep its first requests waiting for the rest to be stored.
MAX_JOBS_PER_GROUP = 256


@dataclass(eq=False)
class _Waiting:
    """One request's jobs, waiting for the thread, and what became of them."""

    requests: list[GenerationRequest]
    owner: str | None
    limits: KeyLimits
    trace_context: str | None
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future
    # The request's context (its request id and span for log lines), as a thread of its own had.
    context: contextvars.Context
    outcome: list[Submission] | Exception | None = None
    prepared: list[PreparedJob] = field(default_factory=list)


class StoreGroups:
    """The thread that stores the jobs of concurrent requests together; `store` from the event
    loop. Started on first use; `stop` lets it finish what waits."""

    def __init__(
        self,
        database_url: str,
        counter: PromptCounter,
        live: LiveQueues,
        max_jobs: int = MAX_JOBS_PER_GROUP,
    ) -> None:
        self._database_url = database_url
        self._counter, self._live = counter, live
        self._max_jobs = max_jobs
        self._waiting: SimpleQueue[_Waiting | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def store(
        self, requests: list[GenerationRequest], owner: str | None, limits: KeyLimits
    ) -> list[Submission]:
        """Admit, store and send the jobs of one request, in one transaction with those of the
        requests beside it; the same errors as submit_generations after admit."""
        if not request_traced():
            return await self._stored(requests, owner, limits, None)
        with tracer().start_as_current_span("llmq.submit") as span:
            submissions = await self._stored(requests, owner, limits, current_traceparent())
            if span.is_recording():
                span.set_attribute("llmq.jobs", len(submissions))
                span.set_attribute("llmq.job_ids", [str(s.job.id) for s in submissions])
            return submissions

    async def _stored(self, requests, owner, limits, trace_context) -> list[Submission]:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(
            requests,
            owner,
            limits,
            trace_context,
            loop,
            loop.create_future(),
            contextvars.copy_context(),
        )
        self._started()
        self._waiting.put(waiting)
        return await waiting.answer

    def _started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="llmq-store-groups", daemon=True
                    )
                    self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._waiting.put(None)
            thread.join(timeout_s)

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            try:
                self._store(group)
            except Exception as exc:  # never leave a request without an answer
                log.exception("storing a group of requests failed", requests=len(group))
                _failed([waiting for waiting in group if waiting.outcome is None], exc)
            _answer(group)

    def _next_group(self) -> list[_Waiting] | None:
        first = self._waiting.get()
        if first is None:
            return None
        group, jobs = [first], len(first.requests)
        while jobs < self._max_jobs:
            try:
                waiting = self._waiting.get_nowait()
            except Empty:
                break
            if waiting is None:  # stop once this group is answered
                self._waiting.put(None)
                break
            group.append(waiting)
            jobs += len(waiting.requests)
        return group

    def _store(self, group: list[_Waiting]) -> None:
        # The statements serve several traces at once: each traced request gets an llmq.store
        # span of its own (_stored), and the instrumentations start none.
        with quiet(), get_sessionmaker(self._database_url)() as session:
            admitted = self._admitted(session, group)
            started_ns = time.time_ns()
            prepared = [job for waiting in admitted for job in waiting.prepared]
            try:
                stored = store_prepared(session, prepared)
            except Exception as exc:
                session.rollback()
                if isinstance(exc, OperationalError) or len(admitted) == 1:
                    _failed(admitted, exc)  # Postgres away: each would have failed alone
                    return
                # A value of one request that Postgres refuses (it passed validation) must not
                # fail the others: each is stored in a transaction of its own instead.
                log.warning("group insert failed; storing its requests apart", error=str(exc))
                for waiting in admitted:
                    try:
                        alone = store_prepared(session, waiting.prepared)
                    except Exception as exc:
                        session.rollback()
                        _failed([waiting], exc)
                        continue
                    self._commit(session, [waiting], alone, time.time_ns(), len(group))
                return
            self._commit(session, admitted, stored, started_ns, len(group))

    def _commit(self, session, admitted, stored, started_ns: int, requests: int) -> None:
        """Commit the stored jobs of `admitted`, then send them and set each request's
        submissions; a failed commit is each request's answer (nothing is stored)."""
        try:
            commit_or_confirm(session, [job.id for job, _ in stored])
        except Exception as exc:
            session.rollback()
            _failed(admitted, exc)
            return
        ended_ns = time.time_ns()
        place = 0
        for waiting in admitted:
            mine = stored[place : place + len(waiting.prepared)]
            place += len(mine)
            waiting.context.run(announce, mine, waiting.prepared)
            waiting.outcome = [Submission(job, True, placement) for job, placement in mine]
            record_child(
                waiting.trace_context,
                "llmq.store",
                started_ns,
                ended_ns,
                {"llmq.group_jobs": len(stored), "llmq.group_requests": requests},
            )

    def _admitted(self, session, group: list[_Waiting]) -> list[_Waiting]:
        """The requests whose keys may add their jobs, each with its jobs checked and built;
        a key's jobs admitted earlier in the group count as in flight for its later ones."""
        admitted, adding = [], Counter()
        for waiting in group:
            jobs = len(waiting.requests)
            try:
                admit(session, waiting.owner, waiting.limits, jobs, adding[waiting.owner])
                waiting.prepared = prepare_generations(
                    waiting.requests, self._counter, self._live, waiting.trace_context
                )
            except Exception as exc:  # this request's answer: a 4xx, or 503 with Postgres away
                session.rollback()
                _failed([waiting], exc)
                continue
            adding[waiting.owner] += jobs
            admitted.append(waiting)
        return admitted


def _failed(requests: list[_Waiting], error: Exception) -> None:
    for waiting in requests:
        waiting.outcome = error


def _answer(group: list[_Waiting]) -> None:
    """Each request's outcome, set on its own event loop: one wake-up for each loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Waiting]] = defaultdict(list)
    for waiting in group:
        by_loop[waiting.loop].append(waiting)
    for loop, answered in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, answered)


def _settle(answered: list[_Waiting]) -> None:
    for waiting in answered:
        if waiting.answer.done():  # the request was cancelled; its jobs are stored all the same
            continue
        if isinstance(waiting.outcome, Exception):
            waiting.answer.set_exception(waiting.outcome)
        else:
            waiting.answer.set_result(waiting.outcome)
