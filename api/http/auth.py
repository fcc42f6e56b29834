"""Who is calling: the API key sent as `Authorization: Bearer <key>` (what OpenAI clients send)
or `X-API-Key: <key>`, its role and its limits; each request is counted against its rate limit.

A process trusts what it read about a key for `auth_cache_s` seconds, so a request with a known
key costs no Postgres round trip, only the one to Redis that counts it. A revocation or new
limits made in another process therefore take effect within that time (at once in this one).
With `LLMQ_AUTH=off`, every caller is a local admin that owns nothing and has no limits.
"""

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import OperationalError

from api.http.limits import STATE_KEY, KeyLimits, limits_of
from db.queries import keys as key_queries
from db.queries.keys import Role
from db.session import session_scope
from llmq.errors import AuthenticationFailed, PermissionDenied, RateLimited
from llmq.settings import Settings

log = structlog.get_logger(__name__)

CACHE_ENTRIES = 10_000  # beyond this the cache starts over: random keys cannot grow it forever
NO_KEY = (
    "no API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; an admin "
    "creates keys with `llmq keys create` or POST /v1/admin/keys"
)
UNKNOWN_KEY = "the API key is not valid; check that it was copied whole"
REVOKED_KEY = "the API key was revoked; ask an admin for a new one"


@dataclass(frozen=True)
class Caller:
    key_id: uuid.UUID | None  # None when auth is off
    name: str
    role: Role
    limits: KeyLimits

    @property
    def owner(self) -> str | None:
        """What jobs, usage rows and evaluation runs store as their owner."""
        return None if self.key_id is None else str(self.key_id)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def can_see(self, owner: str | None) -> bool:
        """Whether this caller may see something owned by `owner`: its own, or any for admins."""
        return self.is_admin or (owner is not None and owner == self.owner)

    @property
    def sees_only(self) -> str | None:
        """The owner that lists are limited to; None for admins, who see everyone's."""
        return None if self.is_admin else self.owner


LOCAL_ADMIN = Caller(None, "local", Role.ADMIN, KeyLimits())


class KeyCache:
    """Key hash → the caller, or why the key is refused, for a few seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Caller | str]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> Caller | str | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, found: Caller | str) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= CACHE_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, found)

    def forget(self, key_id: uuid.UUID) -> None:
        with self._lock:
            stale = [
                key_hash
                for key_hash, (_, found) in self._entries.items()
                if isinstance(found, Caller) and found.key_id == key_id
            ]
            for key_hash in stale:
                del self._entries[key_hash]


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = KeyCache(settings.auth_cache_s)

    async def caller(self, key: str | None) -> Caller:
        """The caller that `key` stands for; AuthenticationFailed (401) if none."""
        if not self.settings.auth:
            return LOCAL_ADMIN
        if not key:
            raise AuthenticationFailed(NO_KEY)
        key_hash = key_queries.hash_key(key)
        found = self.cache.get(key_hash)
        if found is None:
            found = await run_in_threadpool(self._lookup, key_hash)
            self.cache.put(key_hash, found)
        if isinstance(found, str):
            raise AuthenticationFailed(found)
        return found

    def _lookup(self, key_hash: str) -> Caller | str:
        with session_scope(self.settings.database_url) as session:
            row = key_queries.use_key(session, key_hash)
            if row is None:
                return REVOKED_KEY if key_queries.is_revoked(session, key_hash) else UNKNOWN_KEY
            return Caller(row.id, row.name, Role(row.role), limits_of(row, self.settings))

    def forget(self, key_id: uuid.UUID) -> None:
        """Read the key afresh on its next request (it was revoked or its limits changed)."""
        self.cache.forget(key_id)

    def ensure_bootstrap_key(self) -> None:
        """Store LLMQ_BOOTSTRAP_ADMIN_KEY as an admin key unless it is there already."""
        secret = self.settings.bootstrap_admin_key
        if secret is None or not self.settings.auth:
            return
        key = secret.get_secret_value()
        try:
            with session_scope(self.settings.database_url) as session:
                added = key_queries.ensure_key(session, key, "bootstrap admin", Role.ADMIN)
                revoked = key_queries.is_revoked(session, key_queries.hash_key(key))
        except OperationalError as exc:  # the API still serves the keys that exist
            log.error("bootstrap admin key not ensured: Postgres unavailable", error=str(exc.orig))
            return
        if added:
            log.info("bootstrap admin key stored", prefix=key_queries.prefix_of(key))
        elif revoked:
            log.warning("the bootstrap admin key is revoked", prefix=key_queries.prefix_of(key))


bearer_scheme = HTTPBearer(
    auto_error=False, description="An API key, as OpenAI clients send it: `Bearer <key>`"
)
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key")


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    x_api_key: Annotated[str | None, Depends(api_key_scheme)],
) -> Caller:
    """The caller behind the request's API key (401 without one), counted against its rate
    limit (429 once spent)."""
    state = request.app.state
    # X-API-Key first: an OpenAI client always sends a Bearer, a placeholder when it has no key.
    key = x_api_key or (bearer.credentials if bearer is not None else None)
    caller = await state.authenticator.caller(key)
    limit = caller.limits.rate_limit_per_minute
    if limit and caller.key_id is not None:
        window = await state.rate_limiter.hit(caller.key_id, limit)
        if window is not None:
            setattr(request.state, STATE_KEY, window)
            if window.exceeded:
                raise RateLimited(limit, window.reset_s)
    return caller


async def require_admin(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    """The caller, if its key is an admin key (403 otherwise)."""
    if not caller.is_admin:
        raise PermissionDenied(
            f"this endpoint needs an admin key; key {caller.name!r} has the {caller.role} role"
        )
    return caller
