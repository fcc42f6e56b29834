"""API key queries. A key is stored only as its SHA-256 hash: the key itself is shown once, when
it is made, and a lookup hashes what the caller sent. Keys are long random strings, so a fast
hash is enough; a slow one (bcrypt) would only protect guessable passwords."""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.tables import ApiKey

KEY_PREFIX = "llmq_"
# The limits a key may set for itself; None means the settings' default.
LIMIT_FIELDS = (
    "rate_limit_per_minute",
    "max_concurrent_jobs",
    "monthly_token_quota",
    "monthly_spend_limit",  # no default: None means no limit
)


class Role(StrEnum):
    USER = "user"  # its own jobs, streams, evaluation runs and usage
    ADMIN = "admin"  # everyone's, and key management


@dataclass(frozen=True)
class Limits:
    rate_limit_per_minute: int | None = None
    max_concurrent_jobs: int | None = None
    monthly_token_quota: int | None = None
    monthly_spend_limit: Decimal | None = None


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def prefix_of(key: str) -> str:
    """The first characters, to tell keys apart in listings; at most a quarter of the key."""
    return key[: min(12, len(key) // 4)]


def create_key(
    session: Session, name: str, role: Role, limits: Limits = Limits(), key: str | None = None
) -> tuple[ApiKey, str]:
    """A new key row and the key itself, which is not stored anywhere."""
    key = key or generate_key()
    row = ApiKey(
        id=uuid.uuid4(),
        name=name,
        key_hash=hash_key(key),
        prefix=prefix_of(key),
        role=role.value,
        **vars(limits),
    )
    session.add(row)
    session.flush()
    return row, key


def ensure_key(session: Session, key: str, name: str, role: Role) -> bool:
    """Store `key` unless its hash is there already (revoked or not); True when it was added.
    Safe when several API processes start at once."""
    added = session.execute(
        pg_insert(ApiKey)
        .values(
            id=uuid.uuid4(),
            name=name,
            key_hash=hash_key(key),
            prefix=prefix_of(key),
            role=role.value,
        )
        .on_conflict_do_nothing(index_elements=[ApiKey.key_hash])
        .returning(ApiKey.id)
    ).first()
    return added is not None


def use_key(session: Session, key_hash: str) -> ApiKey | None:
    """The unrevoked key with this hash, marked as used now; None if unknown or revoked."""
    return session.scalars(
        update(ApiKey)
        .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        .values(last_used_at=func.now())
        .returning(ApiKey)
    ).first()


def is_revoked(session: Session, key_hash: str) -> bool:
    revoked_at = session.scalar(select(ApiKey.revoked_at).where(ApiKey.key_hash == key_hash))
    return revoked_at is not None


def get_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def get_keys(session: Session, key_ids: list[uuid.UUID]) -> dict[uuid.UUID, ApiKey]:
    if not key_ids:
        return {}
    return {row.id: row for row in session.scalars(select(ApiKey).where(ApiKey.id.in_(key_ids)))}


def list_keys(
    session: Session, *, include_revoked: bool = True, limit: int = 100, offset: int = 0
) -> tuple[list[ApiKey], int]:
    """Keys, newest first."""
    stmt = select(ApiKey)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(
        stmt.order_by(ApiKey.created_at.desc(), ApiKey.id).limit(limit).offset(offset)
    )
    return list(rows), total


def find_keys(session: Session, id_or_prefix: str) -> list[ApiKey]:
    """Keys whose id is `id_or_prefix`, or whose prefix starts with it (for the CLI)."""
    try:
        key_id = uuid.UUID(id_or_prefix)
    except ValueError:
        return list(session.scalars(select(ApiKey).where(ApiKey.prefix.startswith(id_or_prefix))))
    key = session.get(ApiKey, key_id)
    return [key] if key is not None else []


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey | None:
    """Revoke a key; revoking it again keeps the first revocation time. None if unknown."""
    return session.scalars(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(revoked_at=func.coalesce(ApiKey.revoked_at, func.now()))
        .returning(ApiKey)
    ).first()


def update_key(session: Session, key_id: uuid.UUID, changes: dict[str, Any]) -> ApiKey | None:
    """Change a key's name or limits (a limit of None: back to the default). None if unknown."""
    if not changes:
        return session.get(ApiKey, key_id)
    return session.scalars(
        update(ApiKey).where(ApiKey.id == key_id).values(**changes).returning(ApiKey)
    ).first()
