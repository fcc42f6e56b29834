"""Every bad input gets a 4xx whose message says what to fix; nothing is stored for it."""

import pytest


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
