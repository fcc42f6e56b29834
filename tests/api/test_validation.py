"""Every bad input gets a 4xx whose message says what to fix; nothing is stored for it."""

import json

import pytest

JSON_BODY = {"content-type": "application/json"}


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def test_unknown_model_is_404_listing_served_models(client):
    message = _error(client.post("/v1/jobs", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert "gpt-9" in message
    assert "tiny-llama" in message and "tiny-offline" in message


def test_empty_prompt_is_400(client):
    message = _error(client.post("/v1/jobs", json={"model": "tiny-llama", "prompt": ""}), 400)
    assert "prompt" in message and "at least 1 character" in message


@pytest.mark.parametrize("max_tokens", [0, -5, 10**6])
def test_max_tokens_out_of_range_is_400(client, max_tokens):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": max_tokens}
    assert "max_tokens" in _error(client.post("/v1/jobs", json=body), 400)


def test_prompt_longer_than_context_is_400_with_both_numbers(client, tiny_model_path):
    from transformers import AutoTokenizer

    prompt = "word " * 400
    tokens = len(AutoTokenizer.from_pretrained(tiny_model_path)(prompt).input_ids)
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 8}
    message = _error(client.post("/v1/jobs", json=body), 400)
    assert "this model accepts 128" in message
    assert f"prompt is {tokens:,} tokens" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "12"),
        ("temperature", "hot"),
        ("prompt", 42),
        ("ignore_eos", "yes"),
        ("stop", 5),
        ("seed", 1.5),
        ("max_tokens", True),
    ],
)
def test_wrong_types_are_400_naming_the_field(client, field, value):
    body = {"model": "tiny-llama", "prompt": "hi", field: value}
    assert field in _error(client.post("/v1/jobs", json=body), 400)


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", -1), ("temperature", 5), ("top_p", 0), ("top_k", -1)]
)
def test_sampling_parameters_out_of_range_are_400(client, field, value):
    body = {"model": "tiny-llama", "prompt": "hi", field: value}
    assert field in _error(client.post("/v1/jobs", json=body), 400)


def test_unknown_field_is_400_naming_it(client):
    body = {"model": "tiny-llama", "prompt": "hi", "max_new_tokens": 5}
    assert "unknown field 'max_new_tokens'" in _error(client.post("/v1/jobs", json=body), 400)


def test_missing_prompt_is_400(client):
    assert "'prompt' is required" in _error(client.post("/v1/jobs", json={"model": "x"}), 400)


def test_malformed_json_is_400(client):
    response = client.post(
        "/v1/jobs",
        content=b'{"model": "tiny-llama", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert "not valid JSON" in _error(response, 400)


def test_nan_temperature_is_400(client):
    response = client.post(
        "/v1/jobs",
        content=b'{"model": "tiny-llama", "prompt": "hi", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400


def test_rejected_input_stores_no_job(client):
    before = client.get("/v1/jobs", params={"limit": 1}).json()["total"]
    client.post("/v1/jobs", json={"model": "tiny-llama", "prompt": ""})
    client.post("/v1/jobs", json={"model": "nope", "prompt": "hi"})
    assert client.get("/v1/jobs", params={"limit": 1}).json()["total"] == before


def test_prompt_with_nul_character_is_400(client):
    body = {"model": "tiny-llama", "prompt": "a\u0000b"}
    assert "NUL" in _error(client.post("/v1/jobs", json=body), 400)


def test_invalid_utf8_is_400(client):
    response = client.post(
        "/v1/jobs",
        content=b'{"model": "tiny-llama", "prompt": "caf\xe9"}',
        headers={"content-type": "application/json"},
    )
    assert "UTF-8" in _error(response, 400)


def test_wrong_content_type_is_415(client):
    response = client.post(
        "/v1/jobs",
        content=b'{"model": "tiny-llama", "prompt": "hi"}',
        headers={"content-type": "text/plain"},
    )
    assert "application/json" in _error(response, 415)


def test_body_over_the_size_limit_is_413(client):
    body = {"model": "tiny-llama", "prompt": "x" * (9 * 1024 * 1024)}
    assert "larger than 8,388,608 bytes" in _error(client.post("/v1/jobs", json=body), 413)


def test_chunked_body_over_the_size_limit_is_413(client):
    chunks = (b"x" * 1024 * 1024 for _ in range(9))
    response = client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"})
    assert "larger than" in _error(response, 413)


@pytest.mark.parametrize("value", [10**30, -(10**30), 1e308])
def test_huge_numbers_are_400(client, value):
    body = {"model": "tiny-llama", "prompt": "hi", "seed": value}
    assert "seed" in _error(client.post("/v1/jobs", json=body), 400)


def test_oversized_n_is_400(client):
    body = {"model": "tiny-llama", "prompt": "hi", "n": 10_000}
    assert "'n'" in _error(client.post("/v1/completions", json=body), 400)


@pytest.mark.parametrize("path", ["/v1/jobs/not-a-uuid", "/v1/jobs/123/events"])
def test_malformed_job_id_is_400(client, path):
    assert "UUID" in _error(client.get(path), 400)


def test_unknown_job_id_is_404(client):
    message = _error(client.get("/v1/jobs/3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60"), 404)
    assert "3f2b9c4e-8a1d-4c2e-9f7a-1b2c3d4e5f60" in message


def test_nul_character_in_a_query_parameter_is_400(client):
    message = _error(client.get("/v1/jobs", params={"model": "a\x00b"}), 400)
    assert "NUL" in message


def test_malformed_json_names_the_position_not_a_param(client):
    response = client.post(
        "/v1/jobs", content=b'{"model": "tiny-llama", "prompt": }', headers=JSON_BODY
    )
    message = _error(response, 400)
    assert message == (
        "the body is not valid JSON: Expecting value at line 1, column 35 (character 34)"
    )
    assert response.json()["error"]["param"] is None


def test_malformed_json_position_counts_lines(client):
    response = client.post("/v1/jobs", content=b'{\n  "model": "x",\n  oops\n}', headers=JSON_BODY)
    assert "at line 3, column 3 (character 20)" in _error(response, 400)


# -- stop sequences: a string is one sequence, as OpenAI has it ------------------------------


def test_single_string_stop_is_one_sequence_on_jobs(client):
    body = {"model": "tiny-offline", "prompt": "hi", "stop": "Question:", "cache": False}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["stop"] == ["Question:"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Once upon a time"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon"}]}),
    ],
)
def test_single_string_stop_is_one_sequence_on_openai_endpoints(live_client, path, body):
    body |= {"model": "tiny-llama", "max_tokens": 2, "temperature": 0, "stop": "Question:"}
    response = live_client.post(path, json=body)
    assert response.status_code == 200, response.text
    newest = live_client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert newest["params"]["stop"] == ["Question:"]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_single_string_stop_is_one_sequence_in_batch_lines(app, endpoint):
    from api.intake.batch_input import read_input

    body = {"model": "tiny-llama", "stop": "Question:"} | (
        {"prompt": "hi"}
        if endpoint == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    line = {"custom_id": "a", "method": "POST", "url": endpoint, "body": body}
    valid, errors = read_input(json.dumps(line).encode(), endpoint, app.state.registry)
    assert errors == []
    assert valid[0].request.sampling_params(4).stop == ["Question:"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/completions"])
def test_more_than_eight_stop_sequences_is_400(client, path):
    body = {"model": "tiny-llama", "prompt": "hi", "stop": [f"s{i}" for i in range(9)]}
    assert "stop has 9 sequences; send at most 8" in _error(client.post(path, json=body), 400)


@pytest.mark.parametrize("stop", ["", ["Question:", ""]])
def test_empty_stop_sequence_is_400(client, stop):
    body = {"model": "tiny-llama", "prompt": "hi", "stop": stop}
    assert "stop sequence cannot be empty" in _error(client.post("/v1/jobs", json=body), 400)


# -- numbers as JSON Schema counts them ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/jobs", {"model": "not-served", "prompt": "hi", "max_tokens": 5.0, "seed": 7.0}, 404),
        ("/v1/admin/keys", {"name": "whole", "monthly_token_quota": 1000.0}, 201),
    ],
)
def test_integral_float_is_an_integer(client, path, body, status):
    response = client.post(path, json=body)  # 404: past validation, to the model look-up
    assert response.status_code == status, response.text


@pytest.mark.parametrize("value", ["5", True])
def test_openai_integer_fields_take_only_integers(client, value):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": value}
    assert "max_tokens" in _error(client.post("/v1/completions", json=body), 400)


def test_too_many_choices_has_a_code(client):
    body = {"model": "tiny-llama", "prompt": ["a", "b", "c"], "n": 6}
    response = client.post("/v1/completions", json=body)
    assert "3 prompts × n=6 asks for 18 choices; at most 16" in _error(response, 400)
    assert response.json()["error"]["code"] == "too_many_choices"


# -- file uploads are multipart ------------------------------------------------------------


def test_upload_without_purpose_is_400_naming_it(client):
    response = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")})
    assert _error(response, 400) == "'purpose' is required"
    assert response.json()["error"]["param"] == "purpose"


def test_upload_with_empty_purpose_is_400_naming_it(client):
    response = client.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": ""})
    assert _error(response, 400) == "'purpose' is required"


@pytest.mark.parametrize("fields", [{"purpose": "batch"}, {"purpose": "batch", "file": ""}])
def test_upload_without_file_is_400_naming_it(client, fields):
    response = client.post("/v1/files", files={"_": (None, "")}, data=fields)
    assert "'file' is required" in _error(response, 400)
    assert response.json()["error"]["param"] == "file"


def test_upload_for_another_purpose_is_400(client):
    response = client.post(
        "/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}
    )
    assert "'purpose': Input should be 'batch'" in _error(response, 400)


def test_upload_sent_as_json_is_415_asking_for_multipart(client):
    response = client.post("/v1/files", json={"purpose": "batch"})
    assert "send the body as multipart/form-data" in _error(response, 415)


# -- usage periods -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/me/usage", "/v1/admin/usage"])
@pytest.mark.parametrize("value", ["0", "1700000000", "2025-01-01T00:00:00", "2025-1-5"])
def test_usage_day_that_is_not_yyyy_mm_dd_is_400(client, path, value):
    message = _error(client.get(path, params={"end": value}), 400)
    assert f"'end': {value!r} is not a day; send YYYY-MM-DD" in message


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/files", "/v1/me/usage"])
def test_repeated_query_parameter_is_400(client, path):
    name = {"/v1/jobs": "limit", "/v1/files": "purpose", "/v1/me/usage": "end"}[path]
    response = client.get(f"{path}?{name}=5&{name}=500")
    assert _error(response, 400) == f"query parameter '{name}' is given 2 times; send it once"
    assert response.json()["error"]["param"] == name


def test_bad_header_is_400_naming_it(client):
    body = {"model": "tiny-offline", "prompt": "hi"}
    response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k" * 1000})
    _error(response, 400)
    assert response.json()["error"]["param"] == "Idempotency-Key"
