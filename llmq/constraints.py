"""Output constraints (structured output): what a job's text must match, as llguidance grammars.

The API checks a constraint when a job is submitted (a 400 that names the problem, never a job
that fails later), without a tokenizer and without torch; the worker compiles it against its
model's tokenizer (workers/constraints.py) and the engine masks each constrained row's logits
to the tokens the grammar allows.

llguidance (the engine behind vLLM's and Guidance's structured output) was chosen over
xgrammar and outlines-core: it checks a grammar without a tokenizer, so the API refuses a bad
one at once and stays free of torch (importing xgrammar imports torch: 2 s and its memory in
every API process); it builds masks lazily, token by token, so a schema costs next to nothing
to compile; and it reports the JSON Schema keywords it cannot enforce instead of ignoring them.
bench/grammars.py measures the three.

JSON is generated compact (no whitespace between tokens): a model may not pad it without end.
"""

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar"]
# JSON generated without whitespace between tokens; everything else at llguidance's defaults.
JSON_OPTIONS = {"whitespace_flexible": False}
MAX_CHOICES = 1000


class OutputConstraint(BaseModel):
    """What a job's whole text must match: a JSON Schema (as canonical JSON text), a regular
    expression, one of a list of strings (as JSON text), or a Lark or GBNF grammar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ConstraintKind
    value: str = Field(min_length=1)

    @classmethod
    def json_schema(cls, schema: dict | bool) -> "OutputConstraint":
        return cls(kind="json_schema", value=canonical_json(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> "OutputConstraint":
        return cls(kind="choice", value=canonical_json(choices))


def canonical_json(value: object) -> str:
    """One text per value, so that equal constraints share a cache entry and a fingerprint."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def grammar_of(constraint: OutputConstraint) -> str:
    """The constraint as an llguidance grammar (not yet checked)."""
    from llguidance import LLMatcher, grammar_from

    if constraint.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(constraint.value, overrides=JSON_OPTIONS)
    if constraint.kind == "regex":
        return LLMatcher.grammar_from_regex(constraint.value)
    if constraint.kind == "choice":
        return grammar_from("choice", constraint.value)
    return grammar_from("grammar", constraint.value)  # Lark, or GBNF turned into Lark


def constraint_problem(constraint: OutputConstraint) -> str | None:
    """Why the constraint cannot be enforced (an invalid schema, regex or grammar, or a JSON
    Schema keyword the grammar engine does not implement), or None when it can."""
    if constraint.kind == "choice":
        choices = json.loads(constraint.value)
        if not choices:
            return "the list of choices is empty; give at least one"
        if len(choices) > MAX_CHOICES:
            return f"{len(choices)} choices; at most {MAX_CHOICES}"
    from llguidance import LLMatcher

    try:
        grammar = grammar_of(constraint)
    except ValueError as exc:
        return str(exc)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed or messages:  # a warning names what would not be enforced: refuse it too
        return "; ".join(message.strip() for message in messages)
    return None
