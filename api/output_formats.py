"""How a request asks for structured output: OpenAI's `response_format` and vLLM's
`structured_outputs`, turned into one OutputConstraint (llmq/constraints.py) and checked when the
request is submitted."""

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmq.constraints import OutputConstraint, constraint_problem
from llmq.errors import InvalidRequest

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
JsonSchema = Annotated[
    dict[str, Any] | bool, Field(description="A JSON Schema (draft 2020-12 keywords)")
]


class TextFormat(BaseModel):
    model_config = STRICT

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # Named `schema` on the wire; the attribute keeps clear of BaseModel's own.
    json_schema: JsonSchema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = STRICT

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    model_config = STRICT

    json_: JsonSchema | str | None = Field(
        default=None, alias="json", description="A JSON Schema, as an object or as JSON text"
    )
    regex: str | None = Field(default=None, min_length=1, description="The whole text matches")
    choice: list[str] | None = Field(default=None, description="The text is one of these")
    grammar: str | None = Field(
        default=None, min_length=1, description="A Lark grammar (llguidance's), or GBNF"
    )

    def constraint(self) -> OutputConstraint:
        given = {
            name: value
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
            )
            if value is not None
        }
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice and grammar; "
                f"got {', '.join(given) or 'none'}"
            )
        ((kind, value),) = given.items()
        if kind == "json":
            return OutputConstraint.json_schema(_schema_of(value))
        if kind == "choice":
            return OutputConstraint.choice(value)
        return OutputConstraint(kind=kind, value=value)


def _schema_of(value: dict | bool | str) -> dict | bool:
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"structured_outputs.json is not JSON: {exc}") from None


class OutputFormatFields(BaseModel):
    """The fields of a request that constrain its output; at most one of them."""

    model_config = STRICT

    response_format: ResponseFormat | None = Field(
        default=None,
        description="OpenAI's: text, json_object (any JSON object) or json_schema.",
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None,
        description="vLLM's: one of json (a JSON Schema), regex, choice or grammar.",
    )

    def output_constraint(self) -> OutputConstraint | None:
        """The constraint these fields ask for (ValueError for two at once)."""
        formatted = self.response_format
        if isinstance(formatted, TextFormat):
            formatted = None
        if formatted is not None and self.structured_outputs is not None:
            raise ValueError("send response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        if isinstance(formatted, JsonObjectFormat):
            return OutputConstraint.json_schema({"type": "object"})
        if isinstance(formatted, JsonSchemaFormat):
            schema = formatted.json_schema.json_schema
            return OutputConstraint.json_schema({} if schema is None else schema)
        return None

    def checked_constraint(self) -> OutputConstraint | None:
        """output_constraint, refused with a 400 that names the problem when it cannot be
        enforced."""
        param = "structured_outputs" if self.structured_outputs else "response_format"
        try:
            constraint = self.output_constraint()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=param) from None
        if constraint is not None and (problem := _problem(constraint)) is not None:
            raise InvalidRequest(
                f"{param}: the {constraint.kind.replace('_', ' ')} cannot be enforced: {problem}",
                param=param,
            )
        return constraint


@lru_cache(maxsize=1024)
def _problem(constraint: OutputConstraint) -> str | None:
    return constraint_problem(constraint)
