"""What the OpenAI endpoints and the Batch API share: the prompts and token limits a request
asks for, one job per choice on the queue, and the response body built from finished jobs.

A request's choices are stored in one transaction: a request that fails stored none of them,
and one that stored them is answered with them. Planning and submitting render templates and
tokenize, so both run in a worker thread, never on the event loop.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.intake.prompts import PromptCounter, check_prompt_size
from api.intake.submit import GenerationRequest, resolve_model, submit_generations
from api.results.events import FinishedJob, finished_job
from api.schemas.logprobs import TokenTexts, chat_logprobs, completion_logprobs, text_after_prompt
from api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from db.tables import Job
from llmq.protocol import INTERACTIVE_PRIORITY, MAX_TOKENS_LIMIT, PROMPT_TOKEN_IDS_FIELD
from llmq.registry import ModelSpec
from llmq.settings import get_settings

OPENAI_DEFAULT_MAX_TOKENS = 16  # for /v1/completions


@dataclass(frozen=True)
class PlannedRequest:
    """A validated OpenAI request resolved to its model, prompts and token limits."""

    spec: ModelSpec
    body: CompletionRequest | ChatCompletionRequest
    prompts: list[str]  # each prompt's text (of token ids, decoded)
    max_tokens: list[int]
    prompt_tokens: list[int | None] | None = None  # each prompt's, when counted already
    prompt_token_ids: list[list[int] | None] | None = None  # each prompt sent as token ids
    echoed: list[str] | None = None  # with echo: each prompt's text, as the model saw it

    @property
    def chat(self) -> bool:
        return isinstance(self.body, ChatCompletionRequest)

    def shape(self, texts: TokenTexts) -> "ResponseShape":
        echoed = [text for text in self.echoed for _ in range(self.body.n)] if self.echoed else None
        return ResponseShape.of(self.body, self.spec.id, texts, echoed)


@dataclass(frozen=True)
class ResponseShape:
    """What a response body needs beyond its jobs' outcomes."""

    chat: bool
    model: str
    texts: TokenTexts  # the model's token texts
    logprobs: bool = False  # the request asked for log-probabilities
    echoed: list[str] | None = None  # per choice, the prompt text it begins with (echo)
    # A forced tool call: the function's name, or "" when the text names it ("required").
    tool: str | None = None

    @classmethod
    def of(
        cls,
        body: CompletionRequest | ChatCompletionRequest,
        model: str,
        texts: TokenTexts,
        echoed: list[str] | None,
    ) -> "ResponseShape":
        tool = None
        if isinstance(body, ChatCompletionRequest) and body.calls_tool:
            choice = body.tool_choice
            tool = "" if choice == "required" else choice.function.name
        chat = isinstance(body, ChatCompletionRequest)
        return cls(chat, model, texts, body.shows_logprobs, echoed, tool)


@dataclass(frozen=True)
class Choice:
    index: int
    job_id: uuid.UUID
    counts_prompt: bool  # prompt tokens are counted once per prompt, not once per choice
    finished: FinishedJob | None = None  # known at once: answered from the completion cache
    new: bool = False  # stored by this request (not an earlier one's, by its idempotency key)


# Text prompts this short, with no output constraint to check, are planned on the event loop:
# tokenizing them costs less than the thread hop that keeps long ones off it.
INLINE_PLAN_CHARS = 2_000


def plans_inline(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether `plan_request` is cheap enough for the event loop: a completion of short text
    prompts, no constraint. A chat's template and a constraint's check run in a thread."""
    return isinstance(body, CompletionRequest) and checks_inline(body.prompts, body)


def checks_inline(prompts: list, body: Any) -> bool:
    """Whether a request's prompts and output constraint are cheap enough to check on the event
    loop: text prompts of INLINE_PLAN_CHARS in all, and no constraint, whose check may compile
    it (one the request's fields refuse is refused in the thread, as any constraint is
    checked)."""
    if not all(isinstance(p, str) for p in prompts):
        return False
    if sum(len(p) for p in prompts) > INLINE_PLAN_CHARS:
        return False
    try:
        return body.output_constraint() is None
    except ValueError:
        return False


def plan_request(state: Any, body: CompletionRequest | ChatCompletionRequest) -> PlannedRequest:
    """Resolve the model and render the prompts (a chat's through the model's template), once
    they are known to be within the server's size (400 otherwise). CPU-heavy for long prompts:
    call it from a worker thread."""
    spec = resolve_model(state.registry, body.model)
    limit = get_settings().max_prompt_chars
    counter = state.prompt_counter
    counter.check_token_ids(spec, body.token_ids_used())
    body.checked_constraint()  # a 400 now for a constraint that cannot be enforced
    if isinstance(body, CompletionRequest):
        return _plan_completion(counter, spec, body, limit)
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


def _plan_completion(
    counter: PromptCounter, spec: ModelSpec, body: CompletionRequest, limit: int
) -> PlannedRequest:
    texts: list[str] = []
    counted: list[int | None] = []
    token_ids: list[list[int] | None] = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            check_prompt_size(prompt, limit)
            texts.append(prompt)
            counted.append(counter.count(spec, prompt))
            token_ids.append(None)
        else:
            counter.check_token_ids(spec, [("prompt", token) for token in prompt])
            texts.append(counter.decode(spec, prompt))
            counted.append(len(prompt))
            token_ids.append(prompt)
    echoed = None
    if body.echo:
        echoed = [
            _echoed(counter, spec, text, ids, body.truncate_prompt_tokens)
            for text, ids in zip(texts, token_ids, strict=True)
        ]
    max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    return PlannedRequest(spec, body, texts, [max_tokens] * len(texts), counted, token_ids, echoed)


def _echoed(
    counter: PromptCounter, spec: ModelSpec, text: str, ids: list[int] | None, keep: int | None
) -> str:
    """The prompt as echo returns it: its text, or the text of the tokens the model kept."""
    if keep is None:
        return text
    ids = ids if ids is not None else counter.encode(spec, text)
    return text if len(ids) <= keep else counter.decode(spec, ids[-keep:])


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
    requests = choice_requests(
        planned,
        owner=owner,
        request_id=request_id,
        priority=priority,
        batch_id=batch_id,
        idempotency_key=idempotency_key,
    )
    submissions = submit_generations(session, requests, state.prompt_counter, state.live_queues)
    return choices_of(
        planned, [submission.job for submission in submissions], new=submissions[0].created
    )


def choices_of(planned: PlannedRequest, jobs: list[Job], new: bool = False) -> list[Choice]:
    """The request's choices, from its stored jobs (in choice order); `new` when the request
    stored them itself."""
    return [
        Choice(index, job.id, index % planned.body.n == 0, finished_job(job), new)
        for index, job in enumerate(jobs)
    ]


def choice_requests(
    planned: PlannedRequest,
    *,
    owner: str | None = None,
    request_id: str | None = None,
    priority: int = INTERACTIVE_PRIORITY,
    batch_id: str | None = None,
    idempotency_key: str | None = None,
) -> list[GenerationRequest]:
    """The job of each choice (prompt × n), as submit_choices stores them."""
    body, requests = planned.body, []
    counted = planned.prompt_tokens or [None] * len(planned.prompts)
    token_ids = planned.prompt_token_ids or [None] * len(planned.prompts)
    for p, prompt in enumerate(planned.prompts):
        # Once per prompt: building them checks the request's constraint.
        prompt_params = body.sampling_params(planned.max_tokens[p])
        for j in range(body.n):
            params = prompt_params
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
                    prompt_token_ids=token_ids[p],
                    stream_tokens=body.stream,
                )
            )
    return requests


def stored_shape(
    state: Any, body: CompletionRequest | ChatCompletionRequest, jobs: list[Job]
) -> ResponseShape:
    """The response shape of a request whose jobs (one per choice, in order) are stored."""
    spec = resolve_model(state.registry, body.model)
    counter = state.prompt_counter
    echoed = None
    if isinstance(body, CompletionRequest) and body.echo:
        echoed = [
            _echoed(
                counter,
                spec,
                job.input["prompt"],
                job.input.get(PROMPT_TOKEN_IDS_FIELD),
                body.truncate_prompt_tokens,
            )
            for job in jobs
        ]
    return ResponseShape.of(body, spec.id, counter.token_texts(spec), echoed)


def choice_key(idempotency_key: str | None, index: int) -> str | None:
    return None if idempotency_key is None else f"{idempotency_key}:{index}"


def build_response(
    shape: ResponseShape,
    response_id: str,
    created: int,
    finished: list[tuple[int, dict]],
    usage: UsageInfo,
) -> CompletionResponse | ChatCompletionResponse:
    """The response body from each choice's final event (index, done event data)."""
    common = {"id": response_id, "created": created, "model": shape.model, "usage": usage}
    ordered = sorted(finished, key=lambda item: item[0])
    if shape.chat:
        return ChatCompletionResponse(
            **common,
            choices=[
                ChatChoice(
                    index=i,
                    **_chat_answer(shape, d),
                    logprobs=_chat_logprobs(shape, d),
                )
                for i, d in ordered
            ],
        )
    choices = []
    for i, d in ordered:
        text = d["text"]
        if shape.echoed:
            text = shape.echoed[i] + text_after_prompt(shape.texts, d)
        choices.append(
            CompletionChoice(
                index=i,
                text=text,
                finish_reason=d["finish_reason"],
                logprobs=_completion_logprobs(shape, d, shape.echoed[i] if shape.echoed else None),
            )
        )
    return CompletionResponse(**common, choices=choices)


def _chat_answer(shape: ResponseShape, done: dict) -> dict:
    """The choice's message and finish_reason: its text, or the forced tool's call (the text
    is the call's JSON; cut short by max_tokens, it stays text with finish_reason length)."""
    text, finish = done["text"], done["finish_reason"]
    if shape.tool is None or finish != "stop":
        return {"message": AssistantMessage(content=text), "finish_reason": finish}
    if shape.tool:
        name, arguments = shape.tool, text
    else:
        call = json.loads(text)
        name = call["name"]
        arguments = json.dumps(call["arguments"], separators=(",", ":"), ensure_ascii=False)
    tool_call = ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments)
    )
    message = AssistantMessage(content=None, tool_calls=[tool_call])
    return {"message": message, "finish_reason": "tool_calls"}


def _chat_logprobs(shape: ResponseShape, done: dict) -> dict | None:
    if not shape.logprobs:
        return None
    return chat_logprobs(shape.texts, (done.get("logprobs") or {}).get("completion") or [])


def _completion_logprobs(shape: ResponseShape, done: dict, echoed: str | None) -> dict | None:
    """The choice's `logprobs`: with echo, its prompt's tokens (which begin the text), then
    those of its completion (which follow them)."""
    if not shape.logprobs:
        return None
    stored = done.get("logprobs") or {}
    completion = list(stored.get("completion") or [])
    if echoed is None:
        return completion_logprobs(shape.texts, completion)
    shaped = completion_logprobs(shape.texts, list(stored.get("prompt") or []))
    after = completion_logprobs(shape.texts, completion, len(echoed), starts_text=False)
    return {name: shaped[name] + after[name] for name in shaped}
