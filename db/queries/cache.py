"""Completion cache queries: deterministic results stored and served, and identical jobs in
flight coalesced onto one run.

Keys come from llmq/fingerprint.py. A job that may use the cache carries its `cache_key`, and
the fingerprint's columns in its input, so that the worker stores the entry under exactly the
key the API looked up. A job that arrives while an identical one (its leader) is queued or
running follows it: it is not sent to the broker, and the transaction that stores the leader's
outcome settles its followers too. `find_leader` locks the leader's row while a follower is
added, so a leader can never finish between being found and being followed.
"""

import uuid
from dataclasses import fields
from datetime import timedelta
from functools import lru_cache

from sqlalchemy import (
    Interval,
    Numeric,
    Select,
    String,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.queries.jobs import (
    RUNNABLE,
    NewJob,
    Outcome,
    PriceOf,
    failed_values,
    job_row,
    release_followers,
    usage_values,
)
from db.queries.usage import charged, insert_usage
from db.tables import CompletionCache, Job, JobResult, Usage
from llmq.fingerprint import Fingerprint
from llmq.pricing import Price
from llmq.protocol import ErrorCategory, FinishReason, JobStatus

# Where a job's input keeps its fingerprint (next to "prompt").
FINGERPRINT_FIELD = "fingerprint"
# A cancelled text depends on when it was cut off; only these are the model's own ending.
CACHEABLE_FINISH_REASONS = (FinishReason.STOP.value, FinishReason.LENGTH.value)
# Failures that every identical job would meet; after any other (timeout, lost workers,
# internal), followers run on their own.
INPUT_ERRORS = (ErrorCategory.INVALID_INPUT.value, ErrorCategory.MODEL_ERROR.value)


# The columns a job answered from the cache is stored with, besides those of its NewJob.
HIT_COLUMNS = ("id", "status", "cache_hit", "attempts")


@lru_cache(maxsize=2)
def _answer_statement(expires: bool) -> Select:
    """One query that counts the entry's hit and stores the job, its result and its usage, or
    does nothing when there is no entry. Built once: a hit is the hot path."""
    fresh = [CompletionCache.created_at > func.now() - bindparam("max_age", type_=Interval())]
    entry = (
        update(CompletionCache)
        .where(
            # Not named after columns: an UPDATE would take them for new values.
            CompletionCache.model == bindparam("key_model"),
            CompletionCache.prompt_hash == bindparam("key_prompt_hash"),
            CompletionCache.params_fingerprint == bindparam("key_params_fingerprint"),
            *(fresh if expires else []),
        )
        .values(hits=CompletionCache.hits + 1, last_hit_at=func.now())
        .returning(
            CompletionCache.text,
            CompletionCache.finish_reason,
            CompletionCache.prompt_tokens,
            CompletionCache.completion_tokens,
        )
        .cte("entry")
    )
    jobs = Job.__table__.c
    names = [*HIT_COLUMNS, *(field.name for field in fields(NewJob))]
    values = {name: bindparam(f"job_{name}", type_=jobs[name].type) for name in names}
    values["finished_at"] = func.now()  # started_at stays empty: no worker started it
    stored = (
        insert(Job)
        .from_select(list(values), select(*values.values()).select_from(entry))
        .returning(Job.id, Job.created_at, Job.owner, Job.model)
        .cte("stored")
    )
    both = stored.join(entry, true())  # one row each, or none
    result = insert(JobResult).from_select(
        ["job_id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "duration_ms"],
        select(
            stored.c.id,
            entry.c.text,
            entry.c.finish_reason,
            entry.c.prompt_tokens,
            entry.c.completion_tokens,
            literal(0.0),  # duration: no worker time went into it
        ).select_from(both),
    )
    # The cached price of one token, exact (llmq/pricing.py): Postgres multiplies NUMERICs
    # exactly, so the cost equals Price.cost's. Both null when the model has no price.
    per_token = bindparam("cost_per_token", type_=Numeric(20, 10))
    usage = insert(Usage).from_select(
        [
            "job_id",
            "owner",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "cached",
            "cost",
            "currency",
        ],  # fmt: skip
        select(
            stored.c.id,
            stored.c.owner,
            stored.c.model,
            entry.c.prompt_tokens,
            entry.c.completion_tokens,
            true(),
            (entry.c.prompt_tokens + entry.c.completion_tokens) * per_token,
            bindparam("cost_currency", type_=String(3)),
        ).select_from(both),
    )
    return (
        select(entry, stored.c.created_at)
        .select_from(both)
        .add_cte(result.cte("result"), usage.cte("usage"))
    )


def answer_from_cache(
    session: Session, fingerprint: Fingerprint, new: NewJob, ttl_s: float, price: Price | None
) -> Job | None:
    """The new job answered from the cache entry of its fingerprint, unless there is none or it
    is older than `ttl_s` (0: entries never expire): stored as succeeded, with the entry's
    result and a cached usage row (costed at `price`, the model's price now), and the entry's
    hit counted, in one round trip. The entry's row stays locked until the commit, which
    follows."""
    job = job_row(new)
    job.status = JobStatus.SUCCEEDED.value
    job.cache_hit = True
    job.enqueued_at = None
    params = {f"job_{name}": getattr(job, name) for name in HIT_COLUMNS}
    params |= {f"job_{field.name}": getattr(new, field.name) for field in fields(NewJob)}
    params |= {
        "key_model": fingerprint.model,
        "key_prompt_hash": fingerprint.prompt_hash,
        "key_params_fingerprint": fingerprint.params_fingerprint,
        "max_age": timedelta(seconds=ttl_s),
        "cost_per_token": price.cached_per_token if price is not None else None,
        "cost_currency": price.currency if price is not None else None,
    }
    row = session.execute(_answer_statement(expires=ttl_s > 0), params).first()
    if row is None:
        return None
    if price is not None:
        cost = price.cost(row.prompt_tokens, row.completion_tokens, cached=True)
        job.usage = Usage(cost=cost, currency=price.currency)
        charged(session, new.model, price.currency, cost)
    job.created_at = job.finished_at = row.created_at
    job.result = JobResult(
        job_id=job.id,
        text=row.text,
        finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        time_to_first_token_ms=None,
        duration_ms=0.0,
    )
    return job


def lock_key(session: Session, cache_key: str) -> None:
    """Serialise submissions of one key until the commit, so that of identical requests that
    arrive together, one leads and the others follow it."""
    session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": cache_key}
    )


def find_leader(session: Session, cache_key: str, priority: int) -> uuid.UUID | None:
    """The identical job in flight, its row share-locked until the commit: the transaction
    that stores its outcome waits for this one, and then sees the follower it added. A job
    still queued behind a lower priority (a batch line) is not followed by a more urgent one."""
    return session.scalar(
        select(Job.id)
        .where(
            Job.cache_key == cache_key,
            Job.status.in_(RUNNABLE),
            Job.follows_job_id.is_(None),
            or_(Job.status == JobStatus.RUNNING.value, Job.priority <= priority),
        )
        .order_by(Job.created_at)
        .limit(1)
        .with_for_update(read=True)
    )


def store_entry(session: Session, job: Job, outcome: Outcome) -> bool:
    """Keep a deterministic job's result; a newer result of the same key replaces an older one
    (an expired entry, or two runs that raced)."""
    pieces = job.input.get(FINGERPRINT_FIELD)
    if job.cache_key is None or pieces is None:
        return False
    if outcome.finish_reason not in CACHEABLE_FINISH_REASONS:
        return False
    values = {
        "text": outcome.text,
        "finish_reason": outcome.finish_reason,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "model_revision": pieces["model_revision"],
    }
    new_entry = pg_insert(CompletionCache).values(
        model=job.model,
        prompt_hash=pieces["prompt_hash"],
        params_fingerprint=pieces["params_fingerprint"],
        hits=0,
        **values,
    )
    session.execute(
        new_entry.on_conflict_do_update(
            constraint="uq_completion_cache_key", set_=values | {"created_at": func.now()}
        )
    )
    return True


def complete_followers(
    session: Session, leader: Job, outcome: Outcome, *, price_of: PriceOf
) -> list[uuid.UUID]:
    """Give the leader's result to its queued followers (a cancelled one keeps its status);
    their usage is cached, at the model's cached price now."""
    followers = session.execute(
        update(Job)
        .where(Job.follows_job_id == leader.id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.SUCCEEDED.value, finished_at=func.now())
        .returning(Job.id, Job.owner, Job.model)
    ).all()
    if not followers:
        return []
    session.execute(
        pg_insert(JobResult)
        .values(
            [
                {
                    "job_id": follower.id,
                    "text": outcome.text,
                    "finish_reason": outcome.finish_reason,
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                    "time_to_first_token_ms": None,
                    "duration_ms": 0.0,  # no worker time went into it
                }
                for follower in followers
            ]
        )
        .on_conflict_do_nothing()
    )
    insert_usage(
        session,
        [
            usage_values(follower, outcome, price_of(follower.model), cached=True)
            for follower in followers
        ],
    )
    return [follower.id for follower in followers]


def settle_followers_of_failed(
    session: Session, leader_id: uuid.UUID, category: str, message: str
) -> list[uuid.UUID]:
    """After the leader failed: the same failure for its followers when their common input
    caused it (returns their ids), else a run of their own (`release_followers`)."""
    if category not in INPUT_ERRORS:
        release_followers(session, leader_id)
        return []
    return list(
        session.scalars(
            update(Job)
            .where(Job.follows_job_id == leader_id, Job.status == JobStatus.QUEUED.value)
            .values(failed_values(category, message))
            .returning(Job.id)
        )
    )
