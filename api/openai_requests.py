"""What the OpenAI endpoints and the Batch API share: the prompts and token limits a request
asks for, one job per choice on the queue, and the response body built from finished jobs.

A request's choices are stored in one transaction: a request that fails stored none of them,
and one that stored them is answered with them. Planning and submitting render templates and
tokenize, so both run in a worker thread, never on the event loop.
"""

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.events import FinishedJob, finished_job
from api.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from api.prompts import check_prompt_size
from api.submit import GenerationRequest, resolve_model, submit_generations
from llmq.protocol import INTERACTIVE_PRIORITY, MAX_TOKENS_LIMIT
from llmq.registry import ModelSpec
from llmq.settings import get_settings

OPENAI_DEFAULT_MAX_TOKENS = 16  # for /v1/completions


@dataclass(frozen=True)
class PlannedRequest:
    """A validated OpenAI request resolved to its model, prompts and token limits."""

    spec: ModelSpec
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[str]
    max_tokens: list[int]
    prompt_tokens: list[int | None] | None = None  # each prompt's, when counted already

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)


@dataclass(frozen=True)
class Choice:
    index: int
    job_id: uuid.UUID
    counts_prompt: bool  # prompt tokens are counted once per prompt, not once per choice
    finished: FinishedJob | None = None  # known at once: answered from the completion cache


def plan_request(state: Any, body: CompletionRequest | ChatCompletionRequest) -> PlannedRequest:
    """Resolve the model and render the prompts (a chat's through the model's template), once
    they are known to be within the server's size (400 otherwise). CPU-heavy for long prompts:
    call it from a worker thread."""
    spec = resolve_model(state.registry, body.model)
    limit = get_settings().max_prompt_chars
    counter = state.prompt_counter
    if isinstance(body, CompletionRequest):
        for prompt in body.prompts:
            check_prompt_size(prompt, limit)
        max_tokens = body.max_tokens or OPENAI_DEFAULT_MAX_TOKENS
        counted: list[int | None] = [counter.count(spec, prompt) for prompt in body.prompts]
        return PlannedRequest(spec, body, body.prompts, [max_tokens] * len(body.prompts), counted)
    messages = body.template_messages()
    # Before rendering: the template's own text is small, the messages may not be.
    check_prompt_size("".join(m["content"] for m in messages), limit, "messages")
    prompt = counter.render_chat(spec, messages)
    check_prompt_size(prompt, limit, "messages")
    tokens = counter.count(spec, prompt)
    requested = body.requested_max_tokens
    if requested is None:  # as vLLM: whatever the context leaves
        requested = max(1, min(spec.context_length - tokens, MAX_TOKENS_LIMIT))
    return PlannedRequest(spec, body, [prompt], [requested], [tokens])


def submit_choices(
    session: Session,
    state: Any,
    planned: PlannedRequest,
    *,
    owner: str | None = None,
    request_id: str | None = None,
    priority: int = INTERACTIVE_PRIORITY,
    batch_id: str | None = None,
    idempotency_key: str | None = None,
) -> list[Choice]:
    """One job per prompt × n, all committed in one transaction, then queued. A seed gives
    choice j the seed + j. With an idempotency key, choice i is stored under `<key>:<i>`, and
    a request repeated with the key gets the jobs the first one stored."""
    body, requests = planned.body, []
    counted = planned.prompt_tokens or [None] * len(planned.prompts)
    for p, prompt in enumerate(planned.prompts):
        for j in range(body.n):
            params = body.sampling_params(planned.max_tokens[p])
            if params.seed is not None:
                params = params.model_copy(update={"seed": params.seed + j})
            index = p * body.n + j
            requests.append(
                GenerationRequest(
                    spec=planned.spec,
                    prompt=prompt,
                    params=params,
                    idempotency_key=choice_key(idempotency_key, index),
                    owner=owner,
                    request_id=request_id,
                    priority=priority,
                    batch_id=batch_id,
                    use_cache=body.cache,
                    prompt_tokens=counted[p],
                )
            )
    submissions = submit_generations(session, requests, state.prompt_counter, state.live_queues)
    return [
        Choice(index, submission.job.id, index % body.n == 0, finished_job(submission.job))
        for index, submission in enumerate(submissions)
    ]


def choice_key(idempotency_key: str | None, index: int) -> str | None:
    return None if idempotency_key is None else f"{idempotency_key}:{index}"


def build_response(
    chat: bool,
    model: str,
    response_id: str,
    created: int,
    finished: list[tuple[int, dict]],
    usage: UsageInfo,
) -> CompletionResponse | ChatCompletionResponse:
    """The response body from each choice's final event (index, done event data)."""
    common = {"id": response_id, "created": created, "model": model, "usage": usage}
    ordered = sorted(finished, key=lambda item: item[0])
    if chat:
        return ChatCompletionResponse(
            **common,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=d["text"]),
                    finish_reason=d["finish_reason"],
                )
                for i, d in ordered
            ],
        )
    return CompletionResponse(
        **common,
        choices=[
            CompletionChoice(index=i, text=d["text"], finish_reason=d["finish_reason"])
            for i, d in ordered
        ],
    )
