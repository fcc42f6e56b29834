"""Named schemas: a key's JSON Schemas stored under names (structured output)."""

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.tables import NamedSchema


def create_schema(
    session: Session, *, owner: str | None, name: str, schema: object, description: str | None
) -> NamedSchema:
    stored = NamedSchema(
        id=f"schema-{uuid.uuid4().hex[:24]}",
        owner=owner,
        name=name,
        json_schema=schema,
        description=description,
    )
    session.add(stored)
    session.flush()
    return stored


def get_schema(session: Session, owner: str | None, name: str) -> NamedSchema | None:
    stmt = select(NamedSchema).where(
        NamedSchema.name == name, NamedSchema.owner.is_not_distinct_from(owner)
    )
    return session.scalars(stmt).first()


def list_schemas(session: Session, owner: str | None) -> list[NamedSchema]:
    stmt = select(NamedSchema).where(NamedSchema.owner.is_not_distinct_from(owner))
    return list(session.scalars(stmt.order_by(NamedSchema.name)))


def delete_schema(session: Session, owner: str | None, name: str) -> bool:
    stmt = delete(NamedSchema).where(
        NamedSchema.name == name, NamedSchema.owner.is_not_distinct_from(owner)
    )
    return session.execute(stmt).rowcount > 0
