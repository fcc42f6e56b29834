"""The Batch API: a file of requests run as jobs at batch priority, polled, then downloaded."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.background.batch_driver import expires_at
from api.deps import ApiKeyDep, SessionDep
from api.http.auth import Caller
from api.http.limits import admit
from api.routes.files import owned_file
from api.schemas.batches import BatchCreate, BatchesPublic, BatchPublic, RequestCounts
from db.queries import batches as batch_queries
from db.queries.batches import BatchStatus
from db.tables import Batch
from llmq.errors import BatchNotCancellable, BatchNotFound, InvalidRequest

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def batch_public(session, batch: Batch) -> BatchPublic:
    completed, failed = batch_queries.line_outcomes(session, batch.id)
    failed += len(batch.errors or [])  # lines refused by validation
    return BatchPublic.from_row(
        batch, RequestCounts(total=batch.total, completed=completed, failed=failed)
    )


def _owned_batch(session, caller: Caller, batch_id: str) -> Batch:
    batch = batch_queries.get_batch(session, batch_id, caller.owner, caller.is_admin)
    if batch is None:
        raise BatchNotFound(batch_id)
    return batch


@router.post("", response_model=BatchPublic)
def create_batch(
    body: BatchCreate, session: SessionDep, caller: ApiKeyDep, request: Request
) -> BatchPublic:
    """Create a batch from an uploaded file; it is validated, then its lines are queued.

    A batch counts against its key's token quota, not its limit of jobs at once: its lines
    wait at batch priority instead."""
    stored = owned_file(session, caller, body.input_file_id)
    admit(session, caller.owner, caller.limits, jobs=0)
    if stored.purpose != "batch":
        raise InvalidRequest(
            f"file {stored.id} has purpose {stored.purpose!r}; upload the requests with "
            "purpose 'batch'",
            param="input_file_id",
        )
    batch = batch_queries.create_batch(
        session,
        owner=caller.owner,
        endpoint=body.endpoint,
        input_file_id=stored.id,
        completion_window=body.completion_window,
        batch_metadata=body.metadata,
        expires_at=expires_at(body.completion_window),
    )
    # Built before the commit: once the batch is stored, answering must not need Postgres.
    public = batch_public(session, batch)
    session.commit()
    request.app.state.batch_driver.wake()  # validate it now, not at the idle driver's next look
    return public


@router.get("", response_model=BatchesPublic)
def list_batches(
    session: SessionDep,
    caller: ApiKeyDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchesPublic:
    """The caller's batches, newest first; page with `after` (the last id of a page)."""
    rows = batch_queries.list_batches(session, caller.owner, caller.is_admin, after, limit + 1)
    page = [batch_public(session, b) for b in rows[:limit]]
    return BatchesPublic(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(rows) > limit,
    )


@router.get("/{batch_id}", response_model=BatchPublic)
def read_batch(batch_id: str, session: SessionDep, caller: ApiKeyDep) -> BatchPublic:
    """A batch with its status, request counts and, once ended, its output and error files."""
    return batch_public(session, _owned_batch(session, caller, batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchPublic)
def cancel_batch(
    batch_id: str, session: SessionDep, caller: ApiKeyDep, request: Request
) -> BatchPublic:
    """Cancel a batch: queued lines are dropped, finished ones are kept in the output."""
    batch = _owned_batch(session, caller, batch_id)
    if batch.status in BatchStatus.ENDED:
        raise BatchNotCancellable(f"batch {batch_id} already {batch.status}")
    if batch.status != BatchStatus.CANCELLING:
        batch_queries.set_status(session, batch_id, BatchStatus.CANCELLING)
        session.commit()
        request.app.state.batch_driver.wake()
        session.refresh(batch)
    return batch_public(session, batch)
