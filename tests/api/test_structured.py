"""Structured output through the API with a real worker, on the random tiny-llama (its free
output is noise, so every valid document is the constraint's doing): JSON Schemas, regular
expressions, choices and grammars, greedy and sampled, on every way in."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.factories import ADMIN_KEY, AUTH, bearer, create_key

MODEL = "tiny-llama"
NAME = {"type": "string", "maxLength": 8}
SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "shade": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
        },
        "required": ["colour"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
    {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "minItems": 2,
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}},
                "required": ["id"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": NAME, "maxItems": 2},
        },
        "required": ["owner", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 100},
            {"type": "string", "maxLength": 5},
            {"type": "boolean"},
        ]
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "note": {"type": "string", "maxLength": 8},
            "count": {"type": "integer", "minimum": 0, "maximum": 3},
        },
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
                "minItems": 1,
                "maxItems": 2,
            },
            "label": {"const": "grid"},
        },
        "required": ["matrix", "label"],
        "additionalProperties": False,
    },
]


@pytest.fixture
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=ADMIN_KEY, max_retries=0)


def post(api_server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{api_server}{path}", json={"model": MODEL, **body}, headers=AUTH, timeout=120
    )


def completion(api_server: str, **body) -> dict:
    response = post(api_server, "/v1/completions", {"prompt": "Once upon a time", **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_300_requests_over_10_schemas_all_parse_and_validate(api_server):
    requests = []
    for n in range(300):
        sampled = {"temperature": 1.0, "seed": n} if n % 2 else {"temperature": 0}
        schema = SCHEMAS[n % len(SCHEMAS)]
        if n % 3 == 0:  # through chat's response_format, and vLLM's structured_outputs
            body = {
                "messages": [{"role": "user", "content": f"{n}"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": f"s{n % 10}", "schema": schema, "strict": True},
                },
            }
            path = "/v1/chat/completions"
        else:
            body = {"prompt": f"item {n}", "structured_outputs": {"json": schema}}
            path = "/v1/completions"
        requests.append((path, body | sampled | {"max_tokens": 100, "cache": False}, schema))

    def run(request):
        path, body, schema = request
        response = post(api_server, path, body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return choice["finish_reason"], text, schema

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(run, requests))
    for finish_reason, text, schema in outcomes:
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_and_choice_match_in_full(api_server, temperature):
    pattern = r"[0-9]{3}-[a-z]{2,4}( [A-Z]+)?"
    choices = ["yes", "no", "it depends"]
    for seed in range(10):
        common = {"max_tokens": 40, "temperature": temperature, "seed": seed, "cache": False}
        matched = completion(api_server, structured_outputs={"regex": pattern}, **common)
        assert matched["finish_reason"] == "stop" and re.fullmatch(pattern, matched["text"])
        chosen = completion(api_server, structured_outputs={"choice": choices}, **common)
        assert chosen["text"] in choices and chosen["finish_reason"] == "stop"


def test_a_grammar_and_json_object(api_server):
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/'
    shaped = completion(api_server, max_tokens=60, structured_outputs={"grammar": grammar})
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", shaped["text"]), shaped
    # Any JSON object: keys and values of any length, which a random model may never close
    # within max_tokens (then finish_reason is length and the text a prefix of one).
    objects = [
        completion(
            api_server,
            max_tokens=100,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        for seed in range(8)
    ]
    assert all(o["text"].startswith("{") for o in objects)
    finished = [json.loads(o["text"]) for o in objects if o["finish_reason"] == "stop"]
    assert finished and all(isinstance(o, dict) for o in finished)
    plain = completion(api_server, max_tokens=5, response_format={"type": "text"})
    assert plain["finish_reason"] in ("stop", "length")


class Pet(BaseModel):
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


def test_the_openai_clients_parse_returns_the_object(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "A pet, please"}],
        response_format=Pet,
        max_tokens=90,
        temperature=0,
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_greedy_constrained_output_is_the_same_alone_and_batched(api_server):
    constrained = {
        "max_tokens": 100,
        "temperature": 0,
        "cache": False,
        "structured_outputs": {"json": SCHEMAS[4]},
    }
    alone = completion(api_server, **constrained)["text"]
    neighbours = [
        {"max_tokens": 30, "temperature": 0, "cache": False, "ignore_eos": True},
        {"max_tokens": 60, "cache": False, "structured_outputs": {"regex": "[a-z]{20}"}},
        {"max_tokens": 100, "cache": False, "structured_outputs": {"json": SCHEMAS[0]}},
    ] * 3
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(completion, api_server, **body) for body in neighbours]
        batched = completion(api_server, **constrained)["text"]
        [future.result() for future in futures]
    assert batched == alone


def test_streamed_constrained_output_is_the_whole_output(client):
    ask = {
        "model": MODEL,
        "prompt": "Once",
        "max_tokens": 100,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"json": SCHEMAS[6]}, "cache": False},
    }
    whole = client.completions.create(**ask).choices[0].text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(**ask, stream=True)
        if chunk.choices
    )
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMAS[6])


def test_the_job_api_takes_a_constraint_and_the_cache_tells_them_apart(api_server):
    def job(**constraint):
        body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 0, **constraint}
        response = httpx.post(
            f"{api_server}/v1/jobs",
            params={"wait": 30},
            json={"model": MODEL, **body},
            headers=AUTH,
        )
        assert response.status_code in (200, 202), response.text
        return response.json()

    yes_no = job(structured_outputs={"choice": ["yes", "no"]})
    digits = job(structured_outputs={"regex": "[0-9]{4}"})
    assert yes_no["result"]["text"] in ("yes", "no")
    assert re.fullmatch("[0-9]{4}", digits["result"]["text"])
    again = job(structured_outputs={"regex": "[0-9]{4}"})
    assert again["result"]["text"] == digits["result"]["text"]
    assert again["cache_hit"] or again["follows_job_id"] is not None


BAD = [
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs", "nonsense"),
    ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "", "uniqueItems"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "empty"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs", "missing"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    (
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "",
        "not both",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}},
            }
        },
        "response_format",
        "nope",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format", ""),
]


@pytest.mark.parametrize(("extra", "param", "hint"), BAD)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/jobs"])
def test_a_constraint_that_cannot_be_enforced_is_a_400_at_submission(
    api_server, path, extra, param, hint
):
    response = post(api_server, path, {"prompt": "x", "max_tokens": 5, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error.get("param") or "") + error["message"], error
    assert hint in error["message"], error


def test_a_batch_of_200_json_schema_lines_is_all_valid(client):
    lines = [
        {
            "custom_id": f"line-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"{n}"}],
                "max_tokens": 90,
                "temperature": 1.0,
                "seed": n,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "record", "schema": SCHEMAS[n % 3], "strict": True},
                },
            },
        }
        for n in range(200)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("lines.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 240
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status not in ("failed", "expired", "cancelled"), batch
        assert time.monotonic() < deadline, batch.request_counts
        time.sleep(0.5)
    records = [
        json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()
    ]
    assert len(records) == 200
    for record in records:
        n = int(record["custom_id"].removeprefix("line-"))
        choice = record["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[n % 3])


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}


def test_a_named_tool_is_called_with_valid_arguments(client):
    asked = [{"role": "user", "content": "Weather?"}]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=asked,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=90,
        temperature=0,  # deterministic: a sampled city may run on in escaped characters
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_weather"])
    # The conversation goes on with the call and the tool's result in it.
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=[
            *asked,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
        ],
        max_tokens=4,
    )
    assert follow_up.choices[0].message.content is not None


def test_required_calls_one_of_the_tools(client):
    for seed in range(6):
        choice = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=80,
            temperature=1.0,
            seed=seed,
        ).choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])


@pytest.mark.parametrize(
    ("extra", "hint"),
    [
        ({"tools": [WEATHER]}, "auto"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not one of the tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "stream": True}, "stream"),
    ],
)
def test_tool_requests_llmq_cannot_serve_are_a_400(api_server, extra, hint):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    response = post(api_server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert hint in response.json()["error"]["message"]


def test_named_schemas_are_the_keys_own_and_used_by_name(api_server):

    with httpx.Client(base_url=api_server, headers=AUTH, timeout=60) as admin:
        name = f"point-{time.monotonic_ns()}"
        created = admin.post("/v1/schemas", json={"name": name, "schema": SCHEMAS[6]})
        assert created.status_code == 201, created.text
        assert created.json()["schema"] == SCHEMAS[6]
        again = admin.post("/v1/schemas", json={"name": name, "schema": SCHEMAS[0]})
        assert again.status_code == 409 and again.json()["error"]["code"] == "schema_name_taken"
        refused = admin.post("/v1/schemas", json={"name": "bad", "schema": {"type": "nope"}})
        assert refused.status_code == 400
        by_name = {"type": "json_schema", "json_schema": {"name": name}}
        chat = admin.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "?"}],
                "max_tokens": 90,
                "response_format": by_name,
            },
        )
        assert chat.status_code == 200, chat.text
        content = chat.json()["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMAS[6])
        job = admin.post(
            "/v1/jobs",
            params={"wait": 30},
            json={"model": MODEL, "prompt": "x", "max_tokens": 90, "response_format": by_name},
        ).json()
        jsonschema.validate(json.loads(job["result"]["text"]), SCHEMAS[6])
        assert name in [s["name"] for s in admin.get("/v1/schemas").json()["data"]]
        other = create_key(admin, "another team")["key"]
        with httpx.Client(base_url=api_server, headers=bearer(other), timeout=60) as stranger:
            assert stranger.get(f"/v1/schemas/{name}").status_code == 404
            unknown = stranger.post(
                "/v1/jobs",
                json={"model": MODEL, "prompt": "x", "max_tokens": 5, "response_format": by_name},
            )
            assert unknown.status_code == 404, unknown.text
            assert unknown.json()["error"]["code"] == "schema_not_found"
        assert admin.delete(f"/v1/schemas/{name}").status_code == 204
        assert admin.get(f"/v1/schemas/{name}").status_code == 404
