"""One completion request to a remote model's upstream (an OpenAI-compatible `/v1`), streamed:
the request body built from a job's sampling parameters, the server-sent events read back as
text deltas, and every way it can fail sorted into what a retry may cure and what it cannot.

Errors:
- UpstreamTransient: connection refused or reset, a timeout, a stream cut by the connection,
  429 (with the upstream's Retry-After), 5xx — retried while the job's deadline allows;
- UpstreamRefused: a 4xx that is the request's fault (400, 413, 422): the job fails at once with
  the upstream's message, category invalid_input, and the breaker does not count it;
- UpstreamError: an answer that is not an OpenAI completion stream (not JSON, the wrong shape,
  a stream that ends without a finish reason) or a refusal that is the configuration's fault
  (401, 403, 404): the job fails with category upstream_error and the upstream's text.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from httpx_sse import SSEError, connect_sse
from pydantic import BaseModel, ValidationError

from llmq.protocol import PROMPT_TOKEN_IDS_FIELD, ErrorCategory, FinishReason, SamplingParams
from llmq.registry import RemoteUpstream
from workers.engine_jobs import JobFailed

# Statuses that are the request's own fault: sending it again cannot help.
REQUEST_FAULTS = {400, 413, 422}
# How much of an upstream's error body goes into the job's error message.
MAX_ERROR_TEXT = 500


class UpstreamTransient(Exception):
    """A failure a later attempt may not meet."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamRefused(JobFailed):
    category = ErrorCategory.INVALID_INPUT


class UpstreamError(JobFailed):
    category = ErrorCategory.UPSTREAM_ERROR


class _Choice(BaseModel):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class _Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class _Chunk(BaseModel):
    """One event of an OpenAI completion stream; fields llmq does not read are ignored."""

    choices: list[_Choice] = []
    usage: _Usage | None = None


class _Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


class _EchoChoice(BaseModel):
    index: int
    logprobs: _Logprobs


class Echoed(BaseModel):
    """A completion answered whole, its prompts echoed with their log-probabilities."""

    choices: list[_EchoChoice]


@dataclass
class Streamed:
    """What came back: the text, how it ended and, when the upstream said, its token counts."""

    text: str
    finish_reason: FinishReason
    usage: _Usage | None
    deltas: int  # chunks that carried text


def request_body(upstream: RemoteUpstream, job_input: dict, params: SamplingParams) -> dict:
    """The upstream's /v1/completions body for a job: OpenAI's fields, and vLLM's extensions
    (which llmq also takes) only where they differ from their defaults, so a server that knows
    only OpenAI's is not sent names it may refuse."""
    token_ids = job_input.get(PROMPT_TOKEN_IDS_FIELD)
    body: dict = {
        "model": upstream.model,
        "prompt": token_ids if token_ids is not None else job_input["prompt"],
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    openai_optional = {
        "seed": params.seed,
        "stop": params.stop or None,
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in params.logit_bias.items()} or None,
    }
    extensions = {
        "top_k": params.top_k or None,
        "min_p": params.min_p or None,
        "repetition_penalty": params.repetition_penalty if params.repetition_penalty != 1 else None,
        "stop_token_ids": params.stop_token_ids or None,
        "min_tokens": params.min_tokens or None,
        "ignore_eos": params.ignore_eos or None,
        "truncate_prompt_tokens": params.truncate_prompt_tokens,
    }
    body.update({k: v for k, v in (openai_optional | extensions).items() if v is not None})
    return body


class UpstreamClient:
    """The HTTP connection pool to one upstream, shared by the worker's threads."""

    def __init__(self, upstream: RemoteUpstream) -> None:
        self.upstream = upstream
        headers = {}
        # A key that is not set is the configuration's fault, and fixing it needs a restart:
        # until then each request fails as the upstream being away would, so the breaker opens
        # and the model's jobs wait in its queue instead of failing one by one.
        self.misconfigured: str | None = None
        if upstream.api_key_env is not None:
            key = os.environ.get(upstream.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                self.misconfigured = (
                    f"{upstream.api_key_env} is not set in the worker's environment: it must "
                    f"hold the API key of {upstream.base_url}"
                )
        self.client = httpx.Client(
            base_url=upstream.base_url.rstrip("/") + "/",
            headers=headers,
            limits=httpx.Limits(
                max_connections=upstream.max_concurrency,
                max_keepalive_connections=upstream.max_concurrency,
            ),
        )

    def close(self) -> None:
        self.client.close()

    def complete(
        self,
        body: dict,
        read_timeout_s: float,
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> Streamed | None:
        """Stream one completion, handing each text delta to `on_text`; None if `cancelled`
        turned true (the connection is then closed, which ends the upstream's work too)."""
        if self.misconfigured is not None:
            raise UpstreamTransient(self.misconfigured)
        try:
            timeout = self._timeout(read_timeout_s)
            with connect_sse(
                self.client, "POST", "completions", json=body, timeout=timeout
            ) as source:
                _check_status(source.response)
                return _read_stream(source.iter_sse(), on_text, cancelled)
        except SSEError as exc:  # a 200 that is not an event stream (an httpx.TransportError)
            raise UpstreamError(f"the upstream's answer is not an event stream: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTransient(f"the upstream timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            # Refused, reset, or a stream cut by the connection: the upstream went away.
            raise UpstreamTransient(f"the upstream is unreachable: {exc!r}") from exc

    def score(self, body: dict, read_timeout_s: float) -> "Echoed":
        """One completion request answered whole (no stream): prompts echoed with their
        log-probabilities."""
        if self.misconfigured is not None:
            raise UpstreamTransient(self.misconfigured)
        try:
            response = self.client.post(
                "completions", json=body, timeout=self._timeout(read_timeout_s)
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTransient(f"the upstream timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise UpstreamTransient(f"the upstream is unreachable: {exc!r}") from exc
        _check_status(response)
        try:
            return Echoed.model_validate_json(response.content)
        except ValidationError as exc:
            shown = response.text[:MAX_ERROR_TEXT]
            raise UpstreamError(
                f"the upstream's answer has no echoed log-probabilities: {shown}"
            ) from exc

    def _timeout(self, read_timeout_s: float) -> httpx.Timeout:
        connect = self.upstream.connect_timeout_s
        return httpx.Timeout(connect, read=read_timeout_s, write=connect, pool=read_timeout_s)

    def model_names(self) -> list[str]:
        """The upstream's /v1/models ids (a start-up check); raises what complete() raises."""
        if self.misconfigured is not None:
            raise UpstreamTransient(self.misconfigured)
        try:
            response = self.client.get("models", timeout=self.upstream.connect_timeout_s)
        except httpx.HTTPError as exc:
            raise UpstreamTransient(f"the upstream is unreachable: {exc!r}") from exc
        _check_status(response)
        try:
            return [entry["id"] for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(
                f"the upstream's /models answer is not a model list: {exc}"
            ) from exc


def _check_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    text = _error_text(response)
    status = response.status_code
    if status == 429 or status >= 500 or status == 408:
        retry_after = _retry_after(response.headers.get("Retry-After"))
        raise UpstreamTransient(f"the upstream answered {status}: {text}", retry_after)
    if status in REQUEST_FAULTS:
        raise UpstreamRefused(f"the upstream refused the request ({status}): {text}")
    raise UpstreamError(f"the upstream answered {status}: {text}")


def _error_text(response: httpx.Response) -> str:
    """The upstream's error message (OpenAI's envelope), or the start of its body."""
    body = response.read().decode(errors="replace")
    try:
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message[:MAX_ERROR_TEXT]
    except (ValueError, KeyError, TypeError):
        pass
    return body[:MAX_ERROR_TEXT] or "(no body)"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the backoff decides


def _read_stream(events: Iterator, on_text, cancelled) -> Streamed | None:
    text: list[str] = []
    finish: str | None = None
    usage: _Usage | None = None
    deltas = 0
    for event in events:
        if cancelled():
            return None
        if event.data.strip() == "[DONE]":
            break
        try:
            chunk = _Chunk.model_validate_json(event.data)
        except ValidationError as exc:
            shown = event.data[:MAX_ERROR_TEXT]
            raise UpstreamError(
                f"the upstream sent an event that is not a completion: {shown}"
            ) from exc
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.text:
                text.append(choice.text)
                deltas += 1
                on_text(choice.text)
            finish = choice.finish_reason or finish
    if finish is None:
        raise UpstreamError(
            f"the upstream's stream ended without a finish reason after {len(''.join(text))} "
            "characters"
        )
    reason = FinishReason.LENGTH if finish == "length" else FinishReason.STOP
    return Streamed("".join(text), reason, usage, deltas)
