"""OpenAI-compatible wire models: requests, responses and stream chunks, in OpenAI's exact shapes.

Requests carry their conversion to llmq's SamplingParams. Fields OpenAI defines that llmq does
not implement are accepted only at their neutral value and otherwise refused with a 400 that
names them, so no client believes a setting took effect when it did not.
"""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from api.schemas.jobs import (
    MAX_JSON_INT,
    TOKEN_IDS_SCHEMA,
    CostField,
    CostPublic,
    JsonInt,
    JsonIntOrNone,
    SamplingExtras,
    StopSequences,
    alternatives_field,
    reject_nul,
    some_prompts,
)
from api.schemas.logprobs import ChatLogprobs, CompletionLogprobs
from api.schemas.output_formats import ToolFields
from llmq.protocol import MAX_TOKENS_LIMIT, SamplingParams

MAX_CHOICES = 16
# Strict, as OpenAI is: "16" is not a number and 1 is not true. JsonInt still takes 16.0.
WIRE_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def only(*neutral: object) -> WithJsonSchema:
    """The published schema of a field that OpenAI defines and this server does not implement:
    the values that leave it off, which are all the server accepts."""
    return WithJsonSchema(
        {"enum": list(neutral), "description": "Not supported by this server; leave unset."}
    )


NON_EMPTY_TEXT = {"type": "string", "minLength": 1}


class StreamOptions(BaseModel):
    model_config = WIRE_INPUT

    include_usage: bool = False


def requires(field: str, condition: dict, then: dict) -> dict:
    """A JSON Schema rule: when `field` is present and matches `condition`, `then` holds."""
    return {
        "if": {"properties": {field: condition}, "required": [field]},
        "then": then,
    }


def needs_true(field: str) -> dict:
    return {"properties": {field: {"const": True}}, "required": [field]}


# OpenAI's rule, in the published schema too: stream_options needs stream true.
STREAM_OPTIONS_RULE = requires("stream_options", {"type": "object"}, needs_true("stream"))


def rules(*conditions: dict) -> ConfigDict:
    """The wire input's config with cross-field rules published in its schema."""
    return ConfigDict(**WIRE_INPUT, json_schema_extra={"allOf": list(conditions)})


class _SamplingFields(SamplingExtras):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = rules(STREAM_OPTIONS_RULE)

    model: str = Field(min_length=1, max_length=200, examples=["stories260K"])
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: JsonInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSequences | None = None
    seed: JsonIntOrNone = Field(default=None, ge=0, le=MAX_JSON_INT)
    user: str | None = Field(default=None, max_length=200)
    # vLLM-style extras
    top_k: JsonIntOrNone = Field(default=None, ge=-1, le=100_000)
    ignore_eos: bool = False
    # llmq's own: false keeps a deterministic request from the completion cache and from
    # sharing an identical request's run (OpenAI clients send it in extra_body).
    cache: bool = True

    @model_validator(mode="after")
    def stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def top_logprobs_asked(self) -> int | None:
        """Alternatives per generated token, None when no log-probabilities are needed."""
        raise NotImplementedError

    @property
    def shows_logprobs(self) -> bool:
        """Whether the response carries log-probabilities."""
        raise NotImplementedError

    @property
    def prompt_logprobs_asked(self) -> int | None:
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=self.seed,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,
            logprobs=self.top_logprobs_asked,
            prompt_logprobs=self.prompt_logprobs_asked,
            **self.extra_sampling(max_tokens),
        )


class CompletionRequest(_SamplingFields):
    model_config = rules(
        STREAM_OPTIONS_RULE,
        requires("echo", {"const": True}, {"properties": {"stream": {"const": False}}}),
        requires("max_tokens", {"const": 0}, needs_true("echo")),
    )

    prompt: Annotated[
        str | list[int] | list[str] | list[list[int]],
        BeforeValidator(some_prompts),
        WithJsonSchema(
            {
                "anyOf": [
                    NON_EMPTY_TEXT,
                    {
                        "type": "array",
                        "items": NON_EMPTY_TEXT,
                        "minItems": 1,
                        "maxItems": MAX_CHOICES,
                    },
                    TOKEN_IDS_SCHEMA,
                    {
                        "type": "array",
                        "items": TOKEN_IDS_SCHEMA,
                        "minItems": 1,
                        "maxItems": MAX_CHOICES,
                    },
                ],
                "description": f"A prompt (text, or token ids), or a list of up to {MAX_CHOICES}:"
                f" each is answered with n choices, {MAX_CHOICES} choices at most in all.",
            }
        ),
    ]
    # 0 only with echo: the prompt's log-probabilities and nothing generated.
    max_tokens: JsonIntOrNone = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool = Field(
        default=False,
        description="Return the prompt before the completion, and with logprobs the prompt "
        "tokens' log-probabilities too (the first token's is null). Not with stream.",
    )
    logprobs: JsonIntOrNone = alternatives_field(
        "The log-probability of each token and of this many likeliest alternatives at its position."
    )
    best_of: JsonIntOrNone = Field(default=None, ge=1, le=1)
    suffix: Annotated[str | None, only("", None)] = None

    @model_validator(mode="after")
    def refuse_suffix_and_too_many_choices(self):
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it unset")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream; send one of them")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens 0 generates nothing; it is only allowed with echo (to score the "
                "prompt). Send max_tokens >= 1"
            )
        if len(self.prompts) * self.n > MAX_CHOICES:
            # A limit the published schema cannot state; its code lets clients tell it apart.
            raise PydanticCustomError(
                "too_many_choices",
                "{prompts} prompts × n={n} asks for {choices} choices; at most {limit} per request",
                {
                    "prompts": len(self.prompts),
                    "n": self.n,
                    "choices": len(self.prompts) * self.n,
                    "limit": MAX_CHOICES,
                },
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str) or _is_token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    @property
    def top_logprobs_asked(self) -> int | None:
        if self.logprobs is None and self.echo:  # echo's text needs the completion's ids
            return 0
        return self.logprobs

    @property
    def shows_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def prompt_logprobs_asked(self) -> int | None:
        if self.echo and self.max_tokens == 0:  # the prompt's scoring is then the whole job
            return self.logprobs or 0
        return self.logprobs if self.echo else None


def _is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


class TextPart(BaseModel):
    model_config = WIRE_INPUT

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = WIRE_INPUT

    name: str
    arguments: str


class PastToolCall(BaseModel):
    model_config = WIRE_INPUT

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    """A message of the conversation, a tool call an earlier answer made and a tool's result
    included: the model reads each as its text (a call as its JSON)."""

    model_config = ConfigDict(
        **WIRE_INPUT,
        json_schema_extra={
            "anyOf": [
                {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                {
                    "required": ["tool_calls"],
                    "properties": {"tool_calls": {"type": "array", "minItems": 1}},
                },
            ],
            **requires(
                "tool_calls", {"type": "array"}, {"properties": {"role": {"const": "assistant"}}}
            ),
        },
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[PastToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_something_to_say(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content (or, from the assistant, tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            calls = [
                {"name": call.function.name, "arguments": call.function.arguments}
                for call in self.tool_calls or []
            ]
            return json.dumps(calls, ensure_ascii=False)
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(ToolFields, _SamplingFields):
    model_config = rules(
        STREAM_OPTIONS_RULE,
        requires("top_logprobs", {"type": "integer"}, needs_true("logprobs")),
        # llmq generates a forced tool's call; it cannot let the model decide ("auto").
        requires(
            "tools",
            {"type": "array", "minItems": 1},
            {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"type": "null"}}}},
        ),
        requires(
            "tool_choice",
            {"not": {"const": "none"}},
            {
                "properties": {
                    "tools": {"type": "array", "minItems": 1},
                    "stream": {"const": False},  # a forced call is answered whole
                },
                "required": ["tools"],
            },
        ),
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: JsonIntOrNone = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: JsonIntOrNone = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = Field(
        default=None, description="Return the log-probability of each generated token."
    )
    top_logprobs: JsonIntOrNone = alternatives_field(
        "With logprobs: this many likeliest alternatives at each position."
    )

    @model_validator(mode="after")
    def top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def tools_are_forced(self):
        if self.tools and self.tool_choice is None:
            raise ValueError(
                'tools need tool_choice: "required" or a named function (the arguments are '
                'generated under the function\'s parameters schema), or "none"; "auto", where '
                "the model decides whether to call, is not supported"
            )
        if not self.tools and self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        if self.tools and self.tool_choice not in (None, "none") and self.stream:
            raise ValueError("a forced tool call is not streamed; send stream false")
        return self

    @property
    def calls_tool(self) -> bool:
        return bool(self.tools) and self.tool_choice not in (None, "none")

    def output_constraint(self):
        if not self.calls_tool:
            return super().output_constraint()
        if self.response_format is not None or self.structured_outputs is not None:
            raise ValueError(
                "a forced tool call is generated under its parameters schema; send no "
                "response_format or structured_outputs with it"
            )
        return self.tool_constraint()

    def constraint_param(self) -> str:
        return "tool_choice" if self.calls_tool else super().constraint_param()

    @property
    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def shows_logprobs(self) -> bool:
        return bool(self.logprobs)

    @field_validator("messages")
    @classmethod
    def messages_have_no_nul(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for message in messages:
            reject_nul(message.text(), "messages.content")
        return messages

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# -- responses ----------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # llmq's extension: absent when the model has no price, so OpenAI's shape is kept.
    cost: CostPublic | None = CostField

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


def new_response_id(prefix: str) -> tuple[str, int]:
    """An id and a `created` time shared by a response and all of its chunks."""
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


@dataclass(frozen=True)
class ChunkFormat:
    """Stream chunks of one response: the same id and `created` in every chunk."""

    response_id: str
    created: int
    model: str
    chat: bool
    include_usage: bool

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(
        self,
        index: int,
        text: str,
        finish: str | None,
        opening: bool = False,
        logprobs: dict | None = None,
    ):
        if not self.chat:
            body: dict[str, Any] = {"text": text}
        elif opening:
            body = {"delta": {"role": "assistant", "content": ""}}
        else:
            body = {"delta": {"content": text} if text else {}}
        choice = {"index": index, **body, "finish_reason": finish, "logprobs": logprobs}
        chunk = self._envelope([choice])
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: UsageInfo) -> dict[str, Any]:
        return self._envelope([]) | {"usage": usage.model_dump()}
