"""Requests that arrive together share one transaction, as a worker's finished jobs do: a group
commit (llmq/group_commit.py) whose items are requests.

Each request's jobs once took a thread hand-off, an INSERT and a COMMIT of their own: under
load about a fifth of the API's CPU a job and a commit a job in Postgres. Here the group
commit's thread takes every request waiting, admits each against its key's limits, stores the
jobs of all of them in one transaction (those that may meet the completion cache after their
look at it, as submit.py stores them; the others in one INSERT), commits once and sends them;
each request waits on its event loop for its own answer.

Nothing changes for the client: the commit still comes before the answer and before the send,
and an error fails only the requests it concerns: a refused key's request alone (its answer is
the refusal); a value that Postgres refuses fails the group's INSERT, after which the group
commit stores each request alone, so that only that one fails; Postgres away (an
OperationalError) fails every request of the group, none of whose jobs is stored, as it would
have failed each alone. A request with an Idempotency-Key keeps a transaction of its own
(submit.py), since a key that another request stored first rolls back its transaction.
"""

import asyncio
import contextvars
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial

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
    submit_attributes,
)
from db.session import get_sessionmaker
from llmq.group_commit import GroupCommit
from llmq.tracing import later_span, quiet, record_child


@dataclass(frozen=True)
class _Request:
    """One request's jobs, as the group commit's thread takes them."""

    requests: list[GenerationRequest]
    owner: str | None
    limits: KeyLimits
    trace_context: str | None
    # The request's context (its request id and span for log lines), as a thread of its own had.
    context: contextvars.Context


class StoreGroups(GroupCommit[_Request, "list[Submission] | Exception"]):
    """Stores the jobs of concurrent requests together; `store` from the event loop."""

    def __init__(self, database_url: str, counter: PromptCounter, live: LiveQueues) -> None:
        write = partial(_store_group, database_url, counter, live)
        super().__init__("llmq-store-groups", write, group_errors=(OperationalError,))

    async def store(
        self, requests: list[GenerationRequest], owner: str | None, limits: KeyLimits
    ) -> list[Submission]:
        """Admit, store and send the jobs of one request, in one transaction with those of the
        requests beside it; the same errors as submit_generations after admit."""
        # The request's `llmq.submit` span is recorded once its jobs are stored: nothing starts
        # a span inside it (the group's statements run quiet; llmq.store is recorded later too).
        with later_span("llmq.submit") as submit:
            trace_context = submit.traceparent if submit is not None else None
            request = _Request(requests, owner, limits, trace_context, contextvars.copy_context())
            answer = await asyncio.wrap_future(self.submit_async(request))
            if isinstance(answer, Exception):
                raise answer
            if submit is not None:
                submit.attributes.update(submit_attributes(answer))
            return answer


def _store_group(
    database_url: str, counter: PromptCounter, live: LiveQueues, group: list[_Request]
) -> list[list[Submission] | Exception]:
    """The group's answers in order: each request's submissions, or why it was refused. Raises
    (nothing stored) if the INSERT or the COMMIT fails."""
    # The statements serve several traces at once: each traced request gets an llmq.store
    # span of its own, and the instrumentations start none.
    with quiet(), get_sessionmaker(database_url)() as session:
        answers, prepared = _admitted(session, counter, live, group)
        started_ns = time.time_ns()
        stored = store_prepared(session, [job for jobs in prepared.values() for job in jobs])
        commit_or_confirm(session, [job.id for job, _ in stored])
    ended_ns = time.time_ns()
    place = 0
    for index, jobs in prepared.items():
        request, mine = group[index], stored[place : place + len(jobs)]
        place += len(mine)
        request.context.run(announce, mine, jobs)
        answers[index] = [Submission(job, True, placement) for job, placement in mine]
        record_child(
            request.trace_context,
            "llmq.store",
            started_ns,
            ended_ns,
            {"llmq.group_jobs": len(stored), "llmq.group_requests": len(group)},
        )
    return answers


def _admitted(
    session, counter: PromptCounter, live: LiveQueues, group: list[_Request]
) -> tuple[list, dict[int, list[PreparedJob]]]:
    """Each request's refusal, or its jobs checked and built (by its place in the group); a
    key's jobs admitted earlier in the group count as in flight for its later ones."""
    answers: list = [None] * len(group)
    prepared: dict[int, list[PreparedJob]] = {}
    adding: Counter = Counter()
    for index, request in enumerate(group):
        jobs = len(request.requests)
        try:
            admit(session, request.owner, request.limits, jobs, adding[request.owner])
            prepared[index] = prepare_generations(
                request.requests, counter, live, request.trace_context
            )
        except OperationalError:
            raise  # Postgres away: the whole group's answer
        except Exception as exc:  # this request's answer, a 4xx
            session.rollback()
            answers[index] = exc
            continue
        adding[request.owner] += jobs
    return answers, prepared
