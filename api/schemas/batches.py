"""Wire models of the Batch API (`/v1/files`, `/v1/batches`), in OpenAI's shapes."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from db.tables import Batch, StoredFile

BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions"]


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"

    @classmethod
    def from_row(cls, stored: StoredFile) -> "FilePublic":
        return cls(
            id=stored.id,
            bytes=stored.bytes,
            created_at=unix(stored.created_at) or 0,
            filename=stored.filename,
            purpose=stored.purpose,
        )


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: BatchEndpoint
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None

    @classmethod
    def from_row(cls, batch: Batch, counts: RequestCounts) -> "BatchPublic":
        errors = BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            errors=errors,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=unix(batch.created_at) or 0,
            in_progress_at=unix(batch.in_progress_at),
            expires_at=unix(batch.expires_at),
            finalizing_at=unix(batch.finalizing_at),
            completed_at=unix(batch.completed_at),
            failed_at=unix(batch.failed_at),
            expired_at=unix(batch.expired_at),
            cancelling_at=unix(batch.cancelling_at),
            cancelled_at=unix(batch.cancelled_at),
            request_counts=counts,
            metadata=batch.batch_metadata,
        )


class BatchesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchPublic]
    first_id: str | None
    last_id: str | None
    has_more: bool
