"""What the OpenAI endpoints and the Batch API share: the prompts and token limits a request
asks for, one job per choice on the queue, and the response body built from finished jobs."""

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
from api.submit import resolve_model, submit_generation
from llmq.protocol import INTERACTIVE_PRIORITY, MAX_TOKENS_LIMIT
from llmq.registry import ModelSpec

OPENAI_DEFAULT_MAX_TOKENS = 16  # for /v1/completions


@dataclass(frozen=True)
class PlannedRequest:
    """A validated OpenAI request resolved to its model, prompts and token limits."""

    spec: ModelSpec
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[str]
    max_tokens: list[int]

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
    """Resolve the model and render the prompts (a chat's through the model's template)."""
    spec = resolve_model(state.registry, body.model)
    if isinstance(body, CompletionRequest):
        max_tokens = body.max_tokens or OPENAI_DEFAULT_MAX_TOKENS
        return PlannedRequest(spec, body, body.prompts, [max_tokens] * len(body.prompts))
    counter = state.prompt_counter
    prompt = counter.render_chat(spec, body.template_messages())
    requested = body.requested_max_tokens
    if requested is None:  # as vLLM: whatever the context leaves
        room = spec.context_length - counter.count(spec, prompt)
        requested = max(1, min(room, MAX_TOKENS_LIMIT))
    return PlannedRequest(spec, body, [prompt], [requested])


def submit_choices(
    session: Session,
    state: Any,
    planned: PlannedRequest,
    *,
    owner: str | None = None,
    request_id: str | None = None,
    priority: int = INTERACTIVE_PRIORITY,
    batch_id: str | None = None,
) -> list[Choice]:
    """One job per prompt × n, committed and queued. A seed gives choice j the seed + j."""
    body, choices = planned.body, []
    for p, prompt in enumerate(planned.prompts):
        for j in range(body.n):
            params = body.sampling_params(planned.max_tokens[p])
            if params.seed is not None:
                params = params.model_copy(update={"seed": params.seed + j})
            job = submit_generation(
                session,
                spec=planned.spec,
                prompt=prompt,
                params=params,
                counter=state.prompt_counter,
                live=state.live_queues,
                owner=owner,
                request_id=request_id,
                priority=priority,
                batch_id=batch_id,
                use_cache=body.cache,
            ).job
            choices.append(Choice(p * body.n + j, job.id, j == 0, finished_job(job)))
    return choices


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
