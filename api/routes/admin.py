"""Admin endpoints: API keys (list, create, change limits, revoke), usage by key, and recent
failed jobs. Admin keys only (403 for user keys)."""

import uuid
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Query, Request, status

from api.deps import AdminDep, SessionDep, SettingsDep
from api.http.auth import require_admin
from api.http.limits import limits_of
from api.routes.me import EndDay, StartDay, period_bounds, usage_period
from api.schemas.keys import (
    AdminJobPublic,
    AdminJobsPublic,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeysPublic,
    ApiKeyUpdate,
    KeyUsage,
    UsageByKeyPublic,
    UsageTotals,
)
from db.queries import jobs as job_queries
from db.queries import keys as key_queries
from db.queries import usage as usage_queries
from db.queries.keys import Limits, Role
from db.queries.usage import Totals
from db.tables import ApiKey
from llmq.errors import ApiKeyNotFound
from llmq.protocol import JobStatus

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def key_public(row: ApiKey, settings) -> ApiKeyPublic:
    return ApiKeyPublic.from_row(row, limits_of(row, settings))


@router.get("/keys", response_model=ApiKeysPublic)
def list_keys(
    session: SessionDep,
    settings: SettingsDep,
    include_revoked: bool = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ApiKeysPublic:
    """API keys, newest first, with their limits in force. The keys themselves are not kept."""
    rows, total = key_queries.list_keys(
        session, include_revoked=include_revoked, limit=limit, offset=offset
    )
    data = [key_public(row, settings) for row in rows]
    return ApiKeysPublic(data=data, total=total, limit=limit, offset=offset)


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
def create_key(
    body: ApiKeyCreate, session: SessionDep, settings: SettingsDep, caller: AdminDep
) -> ApiKeyCreated:
    """Create a key. The answer holds the key itself, this once: store it now."""
    limits = Limits(
        body.rate_limit_per_minute,
        body.max_concurrent_jobs,
        body.monthly_token_quota,
        body.monthly_spend_limit,
    )
    row, key = key_queries.create_key(session, body.name, Role(body.role), limits)
    # Built before the commit: the key is shown once, so answering must not need Postgres.
    created = ApiKeyCreated(**key_public(row, settings).model_dump(), key=key)
    session.commit()
    log.info("api key created", key_id=str(row.id), prefix=row.prefix, by=caller.owner)
    return created


@router.get("/keys/{key_id}", response_model=ApiKeyPublic)
def read_key(key_id: uuid.UUID, session: SessionDep, settings: SettingsDep) -> ApiKeyPublic:
    """One key, with its limits in force."""
    row = key_queries.get_key(session, key_id)
    if row is None:
        raise ApiKeyNotFound(key_id)
    return key_public(row, settings)


@router.patch("/keys/{key_id}", response_model=ApiKeyPublic)
def update_key(
    key_id: uuid.UUID,
    body: ApiKeyUpdate,
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
) -> ApiKeyPublic:
    """Rename a key or change its limits: only the fields sent change; null restores a
    limit's default. Other API processes apply new limits within LLMQ_AUTH_CACHE_S."""
    row = key_queries.update_key(session, key_id, body.model_dump(exclude_unset=True))
    if row is None:
        raise ApiKeyNotFound(key_id)
    session.commit()
    request.app.state.authenticator.forget(key_id)
    return key_public(row, settings)


@router.post("/keys/{key_id}/revoke", response_model=ApiKeyPublic)
def revoke_key(
    key_id: uuid.UUID, session: SessionDep, settings: SettingsDep, request: Request
) -> ApiKeyPublic:
    """Revoke a key: it is refused with 401 from now on (by other API processes within
    LLMQ_AUTH_CACHE_S). Revoking it again changes nothing."""
    row = key_queries.revoke_key(session, key_id)
    if row is None:
        raise ApiKeyNotFound(key_id)
    session.commit()
    request.app.state.authenticator.forget(key_id)
    log.info("api key revoked", key_id=str(key_id), prefix=row.prefix)
    return key_public(row, settings)


@router.get("/usage", response_model=UsageByKeyPublic)
def read_usage_by_key(
    session: SessionDep, start: StartDay = None, end: EndDay = None
) -> UsageByKeyPublic:
    """Everyone's tokens and cost over a period of UTC days, per key, most tokens first."""
    start, end = usage_period(start, end)
    rows = usage_queries.by_owner(session, *period_bounds(start, end))
    key_ids = {owner: _key_id(owner) for owner, _ in rows}
    keys = key_queries.get_keys(session, [k for k in key_ids.values() if k is not None])
    total, data = Totals(), []
    for owner, totals in rows:
        total.add(totals)
        key = keys.get(key_ids[owner])  # type: ignore[arg-type]
        data.append(
            KeyUsage(
                owner=owner,
                key_id=key.id if key else None,
                name=key.name if key else None,
                prefix=key.prefix if key else None,
                **UsageTotals.of(totals).model_dump(),
            )
        )
    return UsageByKeyPublic(start=start, end=end, total=UsageTotals.of(total), data=data)


def _key_id(owner: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(owner) if owner else None
    except ValueError:
        return None


@router.get("/jobs", response_model=AdminJobsPublic)
def list_recent_jobs(
    session: SessionDep,
    status_filter: Annotated[JobStatus, Query(alias="status")] = JobStatus.FAILED,
    model: Annotated[str | None, Query(max_length=200)] = None,
    owner: Annotated[str | None, Query(max_length=200, description="An API key's id")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> AdminJobsPublic:
    """Everyone's recent jobs, newest first: failed ones by default, with their errors and the
    key that submitted each."""
    rows, total = job_queries.list_jobs(
        session, status=status_filter.value, model=model, owner=owner, limit=limit, offset=offset
    )
    return AdminJobsPublic(
        data=[AdminJobPublic.from_row(job) for job in rows], total=total, limit=limit, offset=offset
    )
