"""Stored files of the Batch API: uploads, and the output and error files of batches."""

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, undefer

from db.tables import StoredFile


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def create_file(
    session: Session, *, owner: str | None, filename: str, purpose: str, content: bytes
) -> StoredFile:
    stored = StoredFile(
        id=new_file_id(),
        owner=owner,
        filename=filename,
        purpose=purpose,
        bytes=len(content),
        content=content,
    )
    session.add(stored)
    session.flush()
    return stored


def _owned(stmt, owner: str | None, admin: bool):
    return stmt if admin else stmt.where(StoredFile.owner.is_not_distinct_from(owner))


def get_file(
    session: Session, file_id: str, owner: str | None, admin: bool = False
) -> StoredFile | None:
    return session.scalars(
        _owned(select(StoredFile).where(StoredFile.id == file_id), owner, admin)
    ).first()


def file_content(session: Session, file_id: str) -> bytes:
    stored = session.scalars(
        select(StoredFile).where(StoredFile.id == file_id).options(undefer(StoredFile.content))
    ).one()
    return stored.content


def list_files(
    session: Session, owner: str | None, admin: bool, purpose: str | None, limit: int
) -> list[StoredFile]:
    stmt = _owned(select(StoredFile), owner, admin)
    if purpose is not None:
        stmt = stmt.where(StoredFile.purpose == purpose)
    return list(session.scalars(stmt.order_by(StoredFile.created_at.desc()).limit(limit)))


def delete_file(session: Session, file_id: str) -> None:
    session.execute(delete(StoredFile).where(StoredFile.id == file_id))
