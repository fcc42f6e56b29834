"""Maps every error to one JSON envelope: {"error": {"message", "type", "param", "code"}}."""

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmq.errors import LlmqError

log = structlog.get_logger(__name__)

RETRY_AFTER_S = 5
# FastAPI's message when a body is not even text (invalid UTF-8, say).
UNPARSABLE_BODY = "There was an error parsing the body"


def is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


# Documented on every route, so clients and schema checks know the error answers.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "The request is malformed or cannot be served as asked; the message says why",
        401: "No API key, or an unknown or revoked one",
        403: "The API key's role may not do this",
        404: "No such job, or the model is not served",
        409: "The job has already finished",
        413: "The request body is too large",
        415: "The body is not JSON",
        429: "A limit of the API key is reached; retry after Retry-After seconds",
        503: "Postgres or Redis is unavailable; retry after Retry-After seconds",
    }.items()
}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per problem, naming the field and what to send instead."""
    parts, first_param = [], None
    for err in exc.errors():
        location = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(location) or "body"
        first_param = first_param or field
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"unknown field '{field}'; remove it")
        elif kind == "missing":
            parts.append(f"'{field}' is required")
        elif kind == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
        elif kind == "uuid_parsing":
            parts.append(f"'{field}' must be a UUID such as 3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60")
        else:
            parts.append(f"'{field}': {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LlmqError)
    async def handle_llmq_error(_request: Request, exc: LlmqError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param, exc.code),
            exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if request.method in ("POST", "PUT", "PATCH") and not is_json(content_type):
            message = (
                f"Content-Type {content_type or '(none)'} is not accepted here; "
                "send the body as JSON with Content-Type: application/json"
            )
            return JSONResponse(error_body(message, "invalid_request_error"), 415)
        message, param = describe_validation_error(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(_request: Request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and message == UNPARSABLE_BODY:
            message = "request body could not be read: send JSON encoded as UTF-8"
        return JSONResponse(error_body(message, error_type), exc.status_code, headers=exc.headers)

    @app.exception_handler(DataError)
    async def handle_unstorable_value(_request: Request, exc: DataError) -> JSONResponse:
        # Input that passed validation but that Postgres cannot hold or compare, such as a NUL
        # character in a text parameter, or a number beyond its range.
        message = f"a value in the request cannot be stored or searched: {exc.orig}; change it"
        return JSONResponse(error_body(message, "invalid_request_error"), 400)

    @app.exception_handler(OperationalError)
    async def handle_database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database unavailable", error=str(exc.orig))
        return JSONResponse(
            error_body("the job database is unavailable; retry shortly", "service_unavailable"),
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
