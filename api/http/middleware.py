"""Request context for every HTTP request: an id, bound to its log lines and returned to the
client (with the request's `traceparent` when it is traced), and a count and a duration for
Prometheus under the route's template.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would buffer
Server-Sent Event streams and run the endpoint in another task, out of reach of the log context.
"""

import re
import time
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.http.errors import error_body
from llmq.tracing import current_traceparent, quiet_unless_traced

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# The request's trace (W3C Trace Context), when it is traced: a client finds its trace by it.
TRACEPARENT_HEADER = "traceparent"
# A client's id is kept when it is short and made of characters that are safe in logs and URLs;
# anything else is replaced, not refused, so that tracing never fails a request.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Polled by probes and Prometheus: counted, but kept out of the logs.
UNLOGGED_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})
UNMATCHED_ROUTE = "unmatched"  # 404s, so that scanners cannot explode the route label


def accepted_request_id(sent: str | None) -> str:
    """The client's X-Request-ID if it is safe, else a new id."""
    if sent is not None and SAFE_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def route_template(scope: Scope) -> str:
    """The matched route's path with its parameters unfilled, e.g. /v1/jobs/{job_id}."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def internal_error(request_id: str) -> JSONResponse:
    message = f"internal server error; quote request id {request_id} when reporting it"
    return JSONResponse(error_body(message, "server_error"), status_code=500)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accepted_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        traceparent = current_traceparent()  # the tracing middleware's span, outside this one
        status = 500  # what the client gets if the app raises before it answers
        answered = False
        started = time.perf_counter()

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                headers = MutableHeaders(scope=message)
                headers.append(REQUEST_ID_HEADER, request_id)
                if traceparent is not None:
                    headers.append(TRACEPARENT_HEADER, traceparent)
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id), quiet_unless_traced():
            try:
                await self.app(scope, receive, send_with_request_id)
            except Exception:
                # Starlette's last-resort 500 is sent outside this middleware, without the id
                # that the client should quote; answer here, then let the error be logged.
                if not answered:
                    await internal_error(request_id)(scope, receive, send_with_request_id)
                raise
            finally:
                seconds = time.perf_counter() - started
                route = route_template(scope)
                metrics.request_served(scope["method"], route, status, seconds)
                if route not in UNLOGGED_ROUTES:
                    log.info(
                        "request served",
                        method=scope["method"],
                        route=route,
                        status=status,
                        duration_ms=round(seconds * 1000, 1),
                    )
