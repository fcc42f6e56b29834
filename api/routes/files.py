"""The Batch API's files: upload a JSONL of requests, read it back, download batch results."""

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, SessionDep
from api.http.auth import Caller
from api.intake.batch_input import MAX_FILE_BYTES
from api.schemas.batches import FileDeleted, FilePublic, FilesPublic
from db.queries import files as file_queries
from llmq.errors import FileNotFound, InvalidRequest

router = APIRouter(prefix="/v1/files", tags=["batches"])

# Uploads are read in chunks, so a file over the limit is refused before it is all in memory.
CHUNK_BYTES = 1024 * 1024


async def _read_limited(upload: UploadFile) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(CHUNK_BYTES):
        size += len(chunk)
        if size > MAX_FILE_BYTES:
            raise InvalidRequest(
                f"file is larger than {MAX_FILE_BYTES:,} bytes; split it into smaller batches",
                param="file",
            )
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", response_model=FilePublic)
async def create_file(
    session: SessionDep,
    caller: ApiKeyDep,
    file: Annotated[UploadFile, File(description="A JSONL file of batch requests")],
    purpose: Annotated[Literal["batch"], Form(description="What the file is for: batch")],
) -> FilePublic:
    """Upload a file of batch requests (multipart: `file`, `purpose=batch`)."""
    content = await _read_limited(file)
    owner = caller.owner

    def store() -> FilePublic:
        stored = file_queries.create_file(
            session,
            owner=owner,
            filename=(file.filename or "upload.jsonl")[:500],
            purpose=purpose,
            content=content,
        )
        public = FilePublic.from_row(stored)  # before the commit: answering needs no Postgres
        session.commit()
        return public

    return await run_in_threadpool(store)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep,
    caller: ApiKeyDep,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FilesPublic:
    """The caller's files, newest first."""
    rows = file_queries.list_files(session, caller.owner, caller.is_admin, purpose, limit)
    return FilesPublic(data=[FilePublic.from_row(r) for r in rows])


def owned_file(session, caller: Caller, file_id: str):
    """The file if the caller may see it; another key's file is as good as absent (404)."""
    stored = file_queries.get_file(session, file_id, caller.owner, caller.is_admin)
    if stored is None:
        raise FileNotFound(file_id)
    return stored


@router.get("/{file_id}", response_model=FilePublic)
def read_file(file_id: str, session: SessionDep, caller: ApiKeyDep) -> FilePublic:
    """A file's metadata."""
    return FilePublic.from_row(owned_file(session, caller, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}},
)
def read_file_content(file_id: str, session: SessionDep, caller: ApiKeyDep) -> Response:
    """A file's bytes: the requests uploaded, or a batch's output or errors."""
    stored = owned_file(session, caller, file_id)
    return Response(file_queries.file_content(session, stored.id), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, session: SessionDep, caller: ApiKeyDep) -> FileDeleted:
    """Delete a file."""
    stored = owned_file(session, caller, file_id)
    file_queries.delete_file(session, stored.id)
    session.commit()
    return FileDeleted(id=file_id)
