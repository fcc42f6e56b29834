"""Maps every error to one JSON envelope: {"error": {"message", "type", "param", "code"}}."""

from typing import get_args

import structlog
from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic_core.core_schema import ErrorType
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

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


HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
# Where a field sits, as FastAPI's locations begin: not part of its name.
PARAMETER_PLACES = ("body", "query", "path", "header", "cookie")
# pydantic's own error types; any other type is one this API raised, and names its refusal.
PYDANTIC_ERROR_TYPES = frozenset(get_args(ErrorType))


def _json_position(doc: object, position: int) -> str:
    """Line and column of a character offset, as a person counts them."""
    if not isinstance(doc, str):
        return f"at character {position}"
    line = doc.count("\n", 0, position) + 1
    column = position - doc.rfind("\n", 0, position)
    return f"at line {line}, column {column} (character {position})"


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence per problem, naming the field and what to send instead."""
    parts, first_param = [], None
    for err in exc.errors():
        kind = err.get("type", "")
        if kind == "json_invalid":  # its location is a character offset, not a field
            offset = next((p for p in err.get("loc", ()) if isinstance(p, int)), None)
            reason = err.get("ctx", {}).get("error", "")
            if offset is not None:
                reason += " " + _json_position(getattr(exc, "body", None), offset)
            parts.append(f"the body is not valid JSON: {reason}")
            continue
        location = [str(p) for p in err.get("loc", ()) if p not in PARAMETER_PLACES]
        field = ".".join(location) or "body"
        first_param = first_param or field
        if kind == "extra_forbidden":
            parts.append(f"unknown field '{field}'; remove it")
        elif kind == "missing":
            parts.append(f"'{field}' is required")
        elif kind == "uuid_parsing":
            parts.append(f"'{field}' must be a UUID such as 3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60")
        else:
            message = err.get("msg", "invalid value").removeprefix("Value error, ")
            parts.append(f"'{field}': {message}")
    return "; ".join(parts) or "invalid request", first_param


def validation_error_code(exc: RequestValidationError) -> str | None:
    """The code of a refusal this API names itself (too_many_choices), for clients to match."""
    return next((e["type"] for e in exc.errors() if e["type"] not in PYDANTIC_ERROR_TYPES), None)


def body_media(request: Request) -> str | None:
    """What the matched route reads its body as: "form" (an upload), "json", or None."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is None:
        return None
    return "form" if isinstance(body_field.field_info, params.Form) else "json"


def is_form(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type in ("multipart/form-data", "application/x-www-form-urlencoded")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of this path takes. Starlette's 405 names only the methods of
    the first route that matched the path, though GET and POST /v1/jobs are two routes."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


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
        media = body_media(request)
        wrong_type = (media == "json" and not is_json(content_type)) or (
            media == "form" and not is_form(content_type)
        )
        if wrong_type:
            expected = (
                "JSON with Content-Type: application/json"
                if media == "json"
                else "multipart/form-data"
            )
            message = (
                f"Content-Type {content_type or '(none)'} is not accepted here; "
                f"send the body as {expected}"
            )
            return JSONResponse(error_body(message, "invalid_request_error"), 415)
        message, param = describe_validation_error(exc)
        code = validation_error_code(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, code), 400)

    @app.exception_handler(StarletteHTTPException)
    async def handle_http_error(request: Request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message, headers = str(exc.detail), exc.headers
        if exc.status_code == 400 and message == UNPARSABLE_BODY:
            message = "request body could not be read: send JSON encoded as UTF-8"
        allowed = allowed_methods(request) if exc.status_code == 405 else []
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = (
                f"{request.method} is not allowed on {request.url.path}; "
                f"use {' or '.join(m for m in allowed if m != 'HEAD')}"
            )
        return JSONResponse(error_body(message, error_type), exc.status_code, headers=headers)

    @app.exception_handler(DataError)
    async def handle_unstorable_value(_request: Request, exc: DataError) -> JSONResponse:
        # Input that passed validation but that Postgres cannot hold or compare, such as a NUL
        # character in a text parameter, or a number beyond its range.
        message = f"a value in the request cannot be stored or searched: {exc.orig}; change it"
        return JSONResponse(error_body(message, "invalid_request_error"), 400)

    @app.exception_handler(PoolTimeout)
    async def handle_no_free_connection(_request: Request, exc: PoolTimeout) -> JSONResponse:
        # The pool's bounded wait ran out: every connection of this process is busy.
        log.warning("no free database connection", error=str(exc))
        return JSONResponse(
            error_body(
                "the job database has no free connection; retry shortly",
                "service_unavailable",
                code="server_busy",
            ),
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.exception_handler(OperationalError)
    async def handle_database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.warning("database unavailable", error=str(exc.orig))
        return JSONResponse(
            error_body("the job database is unavailable; retry shortly", "service_unavailable"),
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
