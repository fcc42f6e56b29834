"""How a request asks for structured output: OpenAI's `response_format` and vLLM's
`structured_outputs`, turned into one OutputConstraint (llmq/constraints.py) and checked when the
request is submitted."""

from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmq.constraints import OutputConstraint, constraint_problem
from llmq.errors import ConstraintNotEnforceable, SchemaNotFound

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
    json_schema: JsonSchema | None = Field(
        default=None,
        alias="schema",
        description="Left out: the key's named schema of this name (POST /v1/schemas)",
    )
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
            if schema is None:
                raise ValueError(f"the named schema {formatted.json_schema.name!r} was not read")
            return OutputConstraint.json_schema(schema)
        return None

    def named_schema(self) -> str | None:
        """The name of the stored schema this request refers to, if it refers to one."""
        formatted = self.response_format
        if isinstance(formatted, JsonSchemaFormat) and formatted.json_schema.json_schema is None:
            return formatted.json_schema.name
        return None

    def with_schema(self, schema: dict | bool):
        """This request with its named schema's content in place of the name."""
        assert isinstance(self.response_format, JsonSchemaFormat)
        spec = self.response_format.json_schema.model_copy(update={"json_schema": schema})
        formatted = self.response_format.model_copy(update={"json_schema": spec})
        return self.model_copy(update={"response_format": formatted})

    def constraint_param(self) -> str:
        """The field a constraint came from, for error messages."""
        return "structured_outputs" if self.structured_outputs else "response_format"

    def checked_constraint(self) -> OutputConstraint | None:
        """output_constraint, refused with a 400 that names the problem when it cannot be
        enforced."""
        param = self.constraint_param()
        try:
            constraint = self.output_constraint()
        except ValueError as exc:
            raise ConstraintNotEnforceable(str(exc), param=param) from None
        if constraint is not None and (problem := _problem(constraint)) is not None:
            raise ConstraintNotEnforceable(
                f"{param}: the {constraint.kind.replace('_', ' ')} cannot be enforced: {problem}",
                param=param,
            )
        return constraint


@lru_cache(maxsize=1024)
def _problem(constraint: OutputConstraint) -> str | None:
    return constraint_problem(constraint)


# -- function calling ----------------------------------------------------------------------


class FunctionSpec(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: JsonSchema | None = Field(
        default=None, description="The arguments' JSON Schema (none: any JSON object)"
    )
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionName


class ToolFields(BaseModel):
    """Function calling with a forced tool: the arguments are generated under their schema.
    `tool_choice: "auto"` (the model decides whether to call) is not supported: deciding needs a
    model trained to call tools and a parser of its own call syntax, which llmq does not have."""

    model_config = STRICT

    tools: list[ToolSpec] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "required"] | NamedToolChoice | None = Field(
        default=None,
        description='"required" (one of the tools), a named function, or "none". Needed with '
        'tools: "auto" is not supported.',
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted; one call is generated per choice."
    )

    def forced_tools(self) -> list[FunctionSpec] | None:
        """The functions the answer must call one of; None when no tool is forced."""
        choice = self.tool_choice
        if not self.tools or choice is None or choice == "none":
            return None
        functions = [tool.function for tool in self.tools]
        if choice == "required":
            return functions
        named = [function for function in functions if function.name == choice.function.name]
        if not named:
            known = ", ".join(function.name for function in functions)
            raise ValueError(
                f"tool_choice names {choice.function.name!r}, not one of the tools ({known})"
            )
        return named

    def tool_constraint(self) -> OutputConstraint | None:
        """What the generated text must be: the one forced function's arguments, or, with
        several, {"name": ..., "arguments": ...} of one of them."""
        functions = self.forced_tools()
        if functions is None:
            return None
        if len(functions) == 1 and self.tool_choice != "required":
            return OutputConstraint.json_schema(arguments_schema(functions[0]))
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": arguments_schema(f)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ]
        return OutputConstraint.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})


def arguments_schema(function: FunctionSpec) -> dict | bool:
    return {"type": "object"} if function.parameters is None else function.parameters


# -- named schemas -------------------------------------------------------------------------


class SchemaCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=10_000)
    json_schema: JsonSchema = Field(alias="schema")


class SchemaPublic(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    id: str
    object: Literal["schema"] = "schema"
    name: str
    description: str | None
    json_schema: JsonSchema = Field(alias="schema")
    created_at: datetime

    @classmethod
    def from_row(cls, row) -> "SchemaPublic":  # row: db.tables.NamedSchema
        return cls(
            id=row.id,
            name=row.name,
            description=row.description,
            json_schema=row.json_schema,
            created_at=row.created_at,
        )


class SchemasPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[SchemaPublic]


def resolve_named_schema(session, owner: str | None, body):
    """The request with the key's named schema in place of its name (SchemaNotFound, a 404,
    when the key has none of that name: another key's is not seen)."""
    name = body.named_schema()
    if name is None:
        return body
    from db.queries import schemas as schema_queries

    stored = schema_queries.get_schema(session, owner, name)
    if stored is None:
        raise SchemaNotFound(name, param="response_format")
    return body.with_schema(stored.json_schema)
