"""The OpenAI-compatible endpoints with the official `openai` client, sync and async."""

import asyncio
import time
import uuid

import httpx
import openai
import pytest
from redis import Redis

from llmq.events import ErrorEvent
from llmq.publisher import TokenPublisher
from tests.factories import ADMIN_KEY, AUTH


@pytest.fixture
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture
def async_client(api_server):
    return openai.AsyncOpenAI(base_url=f"{api_server}/v1", api_key=ADMIN_KEY, max_retries=0)


def test_models_list_in_openai_format(client):
    ids = {m.id for m in client.models.list()}
    assert {"tiny-llama", "tiny-offline"} <= ids


def test_completion_matches_the_job_api_and_is_a_job(client, api_server):
    response = client.completions.create(
        model="tiny-llama",
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 10
    job = httpx.post(
        f"{api_server}/v1/jobs",
        json={
            "model": "tiny-llama",
            "prompt": "Once upon a time",
            "max_tokens": 10,
            "ignore_eos": True,
        },
        headers=AUTH,
    ).json()
    deadline = time.monotonic() + 30
    while (found := httpx.get(f"{api_server}/v1/jobs/{job['id']}", headers=AUTH).json())[
        "status"
    ] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert found["result"]["text"] == choice.text
    listed = httpx.get(f"{api_server}/v1/jobs", params={"limit": 500}, headers=AUTH).json()["data"]
    assert sum(bool(j["result"]) and j["result"]["text"] == choice.text for j in listed) >= 2


def test_chat_completion_uses_the_chat_template(client, tiny_model_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    response = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_completion_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens == 6
    assert response.usage.prompt_tokens == len(tokenizer(rendered).input_ids)


def test_n_choices_with_a_seed_are_distinct_and_reproducible(client):
    def ask():
        return client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "tell"}],
            n=3,
            seed=11,
            temperature=1.0,
            max_tokens=12,
            extra_body={"ignore_eos": True},
        )

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) == 3
    assert first.usage.completion_tokens == 36


def test_stream_chunks_follow_openai_format_and_add_up(client):
    stream = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    assert chunks[-2].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    again = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=15,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert streamed == again.choices[0].message.content


def test_async_client_streams_completions_with_n(async_client):
    async def run():
        stream = await async_client.completions.create(
            model="tiny-llama",
            prompt="abc",
            max_tokens=8,
            n=2,
            seed=1,
            temperature=0.8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        texts = {0: "", 1: ""}
        finishes = {}
        async for chunk in stream:
            choice = chunk.choices[0]
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        return texts, finishes

    texts, finishes = asyncio.run(run())
    assert finishes == {0: "length", 1: "length"}
    assert all(texts.values())


def test_stop_string_spanning_tokens(client):
    free = client.completions.create(
        model="tiny-llama",
        prompt="The dog",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = free.choices[0].text
    stop = text[7:11]
    stopped = client.completions.create(
        model="tiny-llama",
        prompt="The dog",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.find(stop)]


def test_min_tokens_holds_off_eos(client):
    response = client.completions.create(
        model="tiny-llama",
        prompt="x",
        max_tokens=40,
        temperature=2.0,
        seed=3,
        extra_body={"min_tokens": 30},
    )
    assert response.usage.completion_tokens >= 30


def test_errors_use_the_openai_envelope(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="nope", prompt="x")
    assert "tiny-llama" in not_found.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-llama", prompt="word " * 500, max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-llama", prompt="x", n=99)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="tiny-llama", prompt="x", presence_penalty=1.0)
    assert "presence_penalty" in unsupported.value.body["message"]


def test_error_after_stream_began_raises_api_error(api_server, client, redis_url):
    stream = client.completions.create(
        model="tiny-offline", prompt="fail me", max_tokens=4, stream=True
    )
    jobs = httpx.get(
        f"{api_server}/v1/jobs",
        params={"model": "tiny-offline", "status": "queued"},
        headers=AUTH,
    ).json()["data"]
    job_id = uuid.UUID(next(j["id"] for j in jobs if j["prompt"] == "fail me"))
    # What a worker publishes when a job fails in the model.
    publisher = TokenPublisher(redis_url)
    publisher.publish_final(
        job_id, ErrorEvent(job_id=job_id, category="model_error", message="the model crashed")
    )
    publisher.close()
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(stream)
    httpx.post(f"{api_server}/v1/jobs/{job_id}/cancel", headers=AUTH)


def test_disconnected_stream_cancels_its_job(api_server, redis_url):
    # On the model without a worker the job is certain to be unfinished when the client leaves.
    body = {"model": "tiny-offline", "prompt": "abandoned", "max_tokens": 8, "stream": True}
    with httpx.Client(timeout=30, headers=AUTH) as http:
        with http.stream("POST", f"{api_server}/v1/completions", json=body) as response:
            assert response.status_code == 200
            time.sleep(0.5)
    deadline = time.monotonic() + 20
    while True:
        jobs = httpx.get(
            f"{api_server}/v1/jobs", params={"model": "tiny-offline"}, headers=AUTH
        ).json()["data"]
        job = next(j for j in jobs if j["prompt"] == "abandoned")
        if job["status"] == "cancelled":
            break
        assert time.monotonic() < deadline, f"job still {job['status']}"
        time.sleep(0.1)
    assert job["result"] is None
    assert Redis.from_url(redis_url).pubsub_numsub(f"llmq:events:{job['id']}")[0][1] == 0
