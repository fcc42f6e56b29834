"""Reads and validates a Batch API input file before any of it runs.

Each line is `{"custom_id", "method": "POST", "url", "body"}`, with `url` the batch's endpoint
and `body` a request that endpoint would accept. Problems are reported with their line
numbers (1-based), in OpenAI's batch error shape.
"""

import json
from dataclasses import dataclass

from pydantic import ValidationError

from api.http.errors import describe_validation_error
from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from llmq.registry import Registry

MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_CUSTOM_ID_CHARS = 512
REQUEST_TYPES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


@dataclass(frozen=True)
class RequestLine:
    line: int
    custom_id: str
    url: str
    body: dict
    request: CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class LineError:
    line: int | None
    code: str
    message: str
    param: str | None = None
    custom_id: str | None = None

    def as_batch_error(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def read_input(
    content: bytes, endpoint: str, registry: Registry
) -> tuple[list[RequestLine], list[LineError]]:
    """The valid request lines and the errors of the others."""
    if len(content) > MAX_FILE_BYTES:
        return [], [LineError(None, "too_large", f"the file is over {MAX_FILE_BYTES:,} bytes")]
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [LineError(None, "invalid_encoding", f"the file is not UTF-8: {exc}")]
    raw_lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not raw_lines:
        return [], [LineError(None, "empty_file", "the file has no request lines")]
    if len(raw_lines) > MAX_LINES:
        message = f"the file has {len(raw_lines):,} requests; a batch takes at most {MAX_LINES:,}"
        return [], [LineError(None, "too_many_requests", message)]
    valid, errors, seen = [], [], set()
    for number, raw in raw_lines:
        parsed = _read_line(number, raw, endpoint, registry)
        if isinstance(parsed, LineError):
            errors.append(parsed)
        elif parsed.custom_id in seen:
            message = f"custom_id {parsed.custom_id!r} is used by an earlier line; make it unique"
            errors.append(LineError(number, "duplicate_custom_id", message, "custom_id"))
        else:
            seen.add(parsed.custom_id)
            valid.append(parsed)
    return valid, errors


def _read_line(number: int, raw: str, endpoint: str, registry: Registry) -> RequestLine | LineError:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        return LineError(number, "invalid_json", f"line is not JSON: {exc.msg}")
    if not isinstance(item, dict):
        return LineError(number, "invalid_request", "line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        message = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"
        return LineError(number, "invalid_custom_id", message, "custom_id")
    if item.get("method") != "POST":
        return LineError(number, "invalid_method", "method must be POST", "method", custom_id)
    url = item.get("url")
    if url != endpoint:
        message = f"url {url!r} does not match the batch's endpoint {endpoint!r}"
        return LineError(number, "invalid_url", message, "url", custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_body", "body must be a JSON object", "body", custom_id)
    try:
        request = REQUEST_TYPES[url].model_validate(body)
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        return LineError(number, "invalid_body", message, param, custom_id)
    if request.stream:
        return LineError(number, "invalid_body", "stream is not supported in a batch", "stream")
    if registry.get(request.model) is None:
        message = (
            f"model {request.model!r} is not served here; available: {', '.join(registry.ids)}"
        )
        return LineError(number, "model_not_found", message, "model", custom_id)
    return RequestLine(number, custom_id, url, body, request)
