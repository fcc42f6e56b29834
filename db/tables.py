"""Typed tables. Postgres is the source of truth for every job's state."""

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_model", "status", "model"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_follows_job_id", "follows_job_id"),
        Index("ix_jobs_cache_key_status", "cache_key", "status"),
        Index("ix_jobs_batch_id", "batch_id"),
        Index("ix_jobs_owner_status", "owner", "status"),
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    owner: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(300))
    error_category: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    # The id of the HTTP request that created the job, as returned in its X-Request-ID header.
    request_id: Mapped[str | None] = mapped_column(String(64))
    # When a message for the job was last sent to the broker; the reconciler resends stale ones.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The job's own deadline in seconds, when it overrides its model's default.
    timeout_s: Mapped[float | None] = mapped_column(Float)
    # Answered from the completion cache without running.
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # An identical deterministic job that was already running when this one came: this one is
    # not enqueued, and gets that job's result when it finishes.
    follows_job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # Model, prompt and output-shaping parameters hashed, for deterministic jobs only: the key
    # of the completion cache, and how identical jobs in flight are found.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    # Broker priority: 0, interactive, goes first; batch lines wait behind
    # (see api/intake/enqueue.py).
    priority: Mapped[int] = mapped_column(SmallInteger, default=0, server_default=text("0"))
    batch_id: Mapped[str | None] = mapped_column(String(64))  # the batch this job is a line of
    # The W3C traceparent the job's spans continue (llmq/tracing.py); None when not traced.
    trace_context: Mapped[str | None] = mapped_column(String(64))
    # Whether its text is published token by token as it is generated (an SSE stream may
    # watch it); a non-streamed OpenAI request's job publishes it whole when it ends.
    stream_tokens: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())

    result: Mapped["JobResult | None"] = relationship(back_populates="job", lazy="selectin")
    # Never loaded on its own: the queries that answer reads fill it in (db/queries/jobs.py).
    usage: Mapped["Usage | None"] = relationship(lazy="raise", viewonly=True)


class JobResult(Base):
    __tablename__ = "job_results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # When the job asked for them: {"prompt": [...] | null, "completion": [...] | null}, each
    # token [id, logprob, [[id, logprob], ...]] (llmq/logprobs.py), the prompt's first null.
    logprobs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    job: Mapped[Job] = relationship(back_populates="result")


class Usage(Base):
    """One row per finished job: who used which model for how many tokens."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_owner_created_at", "owner", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    owner: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # What the tokens cost at the model's price when the job finished (llmq/pricing.py: exact,
    # hence NUMERIC with 10 decimal places); null when the model had no price.
    cost: Mapped[Decimal | None] = mapped_column(Numeric(20, 10))
    currency: Mapped[str | None] = mapped_column(String(3))


class CompletionCache(Base):
    """Deterministic completions, keyed by model, prompt and every parameter that shapes output."""

    __tablename__ = "completion_cache"
    __table_args__ = (
        UniqueConstraint(
            "model", "prompt_hash", "params_fingerprint", name="uq_completion_cache_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    model_revision: Mapped[str | None] = mapped_column(String(200))
    prompt_hash: Mapped[str] = mapped_column(String(64))
    params_fingerprint: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_hit_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScoreResult(Base):
    """A scoring job's output: the log-likelihood of each continuation after its prompt."""

    __tablename__ = "score_results"

    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    loglikelihoods: Mapped[list[float]] = mapped_column(JSONB)
    # Whether greedy decoding would produce each continuation, token for token.
    greedy: Mapped[list[bool]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class EvalRun(Base):
    """One benchmark run of one model; its items are the unit of work and of scoring."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_runs_status", "status"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    benchmark: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    num_fewshot: Mapped[int] = mapped_column(Integer)
    limit: Mapped[int | None] = mapped_column(Integer)
    subjects: Mapped[list[str] | None] = mapped_column(JSONB)
    dataset: Mapped[str] = mapped_column(String(1000))
    owner: Mapped[str | None] = mapped_column(String(200))  # the API key that started it
    total: Mapped[int] = mapped_column(Integer, default=0)  # items, once planned
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONB)  # final, once finished
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EvalItem(Base):
    """One benchmark question of a run: the job that answers it, then its grade."""

    __tablename__ = "eval_items"
    __table_args__ = (
        UniqueConstraint("run_id", "position", name="uq_eval_items_run_id_position"),
        Index("ix_eval_items_request_key", "request_key"),
        Index("ix_eval_items_job_id", "job_id"),
        # What the evaluation driver's sweeps read: items with no job yet, and items with a
        # job but no grade. Without them a sweep walked every item of the run before those.
        Index(
            "ix_eval_items_unassigned",
            "run_id",
            "position",
            postgresql_where=text("job_id IS NULL AND graded_at IS NULL"),
        ),
        Index(
            "ix_eval_items_ungraded",
            "run_id",
            "position",
            postgresql_where=text("job_id IS NOT NULL AND graded_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("eval_runs.id", ondelete="CASCADE")
    )
    position: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(100))  # "gsm8k", or the MMLU subject
    doc_index: Mapped[int] = mapped_column(Integer)  # within the task's test split
    kind: Mapped[str] = mapped_column(String(32))  # the job kind: generate or score
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    # Hash of model, kind, input and params: equal keys get equal results, so a finished job
    # answers every item with its key, in any run.
    request_key: Mapped[str] = mapped_column(String(64))
    gold: Mapped[str] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="SET NULL")
    )
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    output: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    metrics: Mapped[dict[str, float] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    graded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """A caller of the API. The key itself is shown once at creation; only its hash is kept."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256, hex
    prefix: Mapped[str] = mapped_column(String(16))  # its first characters, to tell keys apart
    role: Mapped[str] = mapped_column(String(16))  # user | admin
    # Per-key overrides of the settings' defaults; None means the default.
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)
    monthly_token_quota: Mapped[int | None] = mapped_column(BigInteger)
    # In the deployment's currency (llmq/pricing.py); None: no limit.
    monthly_spend_limit: Mapped[Decimal | None] = mapped_column(Numeric(16, 4))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StoredFile(Base):
    """A file uploaded for the Batch API, or a batch's output or error file."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Batch(Base):
    """An OpenAI-style batch: a file of requests, each line run as jobs on the queue."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_status", "status"),
        Index("ix_batches_owner_created_at", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)
    batch_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONB)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NamedSchema(Base):
    """A JSON Schema stored under a name by the key that made it; requests name it in
    response_format's json_schema instead of sending it."""

    __tablename__ = "named_schemas"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_named_schemas_owner_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    json_schema: Mapped[Any] = mapped_column("schema", JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BatchLine(Base):
    """One request line of a batch and the jobs (one per choice) that answer it."""

    __tablename__ = "batch_lines"
    __table_args__ = (UniqueConstraint("batch_id", "line", name="uq_batch_lines_batch_id_line"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64), ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)  # 1-based, as in the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    url: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSONB)
    job_ids: Mapped[list[str]] = mapped_column(JSONB)
