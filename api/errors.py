"""Maps every error to one JSON envelope: {"error": {"message", "type", "param", "code"}}."""

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmq.errors import LlmqError

log = structlog.get_logger(__name__)

RETRY_AFTER_S = 5


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
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status_code == 503 else None
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.param, exc.code),
            exc.status_code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def handle_validation_error(_request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(_request: Request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), error_type), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(OperationalError)
    async def handle_database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database unavailable", error=str(exc.orig))
        return JSONResponse(
            error_body("the job database is unavailable; retry shortly", "service_unavailable"),
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
