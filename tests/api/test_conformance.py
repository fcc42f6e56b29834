"""The published OpenAPI document and the API's behaviour agree: what the schema refuses the
server refuses, what it allows the server takes, 405s name the methods a path has, and every
status the API answers is documented."""

import jsonschema_rs
import pytest

from tests.factories import submit

NOT_SERVED = "not-served"  # a valid body for it passes validation and stops at the model (404)


@pytest.fixture(scope="module")
def document(client):
    return client.get("/openapi.json").json()


def body_validator(document: dict, path: str):
    """A validator of one operation's JSON body against the published document."""
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.Draft202012Validator({**ref, "components": document["components"]})


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/jobs", "GET, POST"),
        ("OPTIONS", "/v1/jobs", "GET, POST"),
        ("PUT", "/v1/files/file-abc", "DELETE, GET"),
        ("OPTIONS", "/v1/admin/keys/3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60", "GET, PATCH"),
    ],
)
def test_405_allows_every_method_of_the_path(client, document, method, path, allowed):
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["message"].startswith(f"{method} is not allowed on {path}")
    template = path.replace("file-abc", "{file_id}").replace(
        "3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60", "{key_id}"
    )
    assert set(document["paths"][template]) == {m.lower() for m in allowed.split(", ")}


def test_repeated_idempotency_key_answers_a_documented_200(client, document):
    key = {"Idempotency-Key": "conformance-repeat"}
    first = submit(client, headers=key, model="tiny-offline", prompt="once")
    again = client.post("/v1/jobs", json={"model": "tiny-offline", "prompt": "once"}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    documented = document["paths"]["/v1/jobs"]["post"]["responses"]["200"]
    assert documented["content"]["application/json"]["schema"]["$ref"].endswith("/JobPublic")


COMPLETION = {"model": NOT_SERVED, "prompt": "hi"}
CHAT = {"model": NOT_SERVED, "messages": [{"role": "user", "content": "hi"}]}
TOO_MANY = [str(i) for i in range(9)]


# (endpoint, a valid body, the field varied, [(its value, whether the body is then valid)])
AGREEMENT_CASES = [
    (
        "/v1/completions",
        COMPLETION,
        "stop",
        [("Question:", 1), (["a", "b"], 1), ([""], 0), (TOO_MANY, 0)],
    ),
    ("/v1/completions", COMPLETION, "logprobs", [(None, 1), (0, 1), (20, 1), ({}, 0), (21, 0)]),
    ("/v1/completions", COMPLETION, "presence_penalty", [(0.5, 1), (None, 1), (2.5, 0)]),
    (
        "/v1/completions",
        COMPLETION,
        "logit_bias",
        [({}, 1), ({"5": -100}, 1), ({"5": 101}, 0), ({"x": 1}, 0)],
    ),
    ("/v1/completions", COMPLETION, "echo", [(False, 1), (True, 1), (None, 0)]),
    ("/v1/completions", COMPLETION, "min_p", [(0.1, 1), (1.5, 0)]),
    ("/v1/completions", COMPLETION, "stop_token_ids", [([2], 1), ([-1], 0)]),
    ("/v1/completions", COMPLETION, "suffix", [("", 1), (None, 1), ("end", 0)]),
    ("/v1/completions", COMPLETION, "prompt", [(["a"], 1), ("", 0), ([], 0), (["a"] * 17, 0)]),
    ("/v1/completions", COMPLETION, "max_tokens", [(4, 1), (4.0, 1), ("4", 0), (True, 0)]),
    ("/v1/completions", COMPLETION, "stream", [(False, 1), (1, 0), ("true", 0)]),
    ("/v1/completions", COMPLETION, "seed", [(2**53 - 1, 1), (2**63 - 1, 0)]),
    ("/v1/completions", COMPLETION, "stream_options", [(None, 1), ({}, 0)]),
    ("/v1/chat/completions", CHAT, "logprobs", [(False, 1), ({}, 0), (True, 1)]),
    ("/v1/chat/completions", CHAT, "top_logprobs", [(None, 1), (21, 0), (-1, 0)]),
    ("/v1/chat/completions", CHAT, "n", [(2, 1), (2.0, 1), ("2", 0)]),
    ("/v1/jobs", COMPLETION, "stop", [("Question:", 1), ([""], 0)]),
    ("/v1/jobs", COMPLETION, "max_tokens", [(8.0, 1), (True, 0), (8.5, 0)]),
    ("/v1/jobs", COMPLETION, "seed", [(2**53 - 1, 1), (2**53, 0)]),
]


@pytest.mark.parametrize(
    ("path", "base", "field", "values"),
    AGREEMENT_CASES,
    ids=[f"{path} {field}" for path, _, field, _ in AGREEMENT_CASES],
)
def test_schema_and_server_agree_on_the_body(client, document, path, base, field, values):
    validator = body_validator(document, path)
    for value, valid in values:
        body = base | {field: value}
        response = client.post(path, json=body)
        assert response.status_code == (404 if valid else 400), (value, response.text)
        assert validator.is_valid(body) is bool(valid), value


def test_schema_and_server_agree_on_last_event_id(client, document):
    (header,) = [
        p
        for p in document["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"]
        if p["name"] == "Last-Event-ID"
    ]
    validator = jsonschema_rs.Draft202012Validator(header["schema"])
    for value, valid in [("12-0", True), ("12", True), ("null", False), ("12-x", False)]:
        response = client.get(
            "/v1/jobs/3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60/events",
            headers={"Last-Event-ID": value},
        )
        assert response.status_code == (404 if valid else 400), (value, response.text)
        assert validator.is_valid(value) is valid, value
