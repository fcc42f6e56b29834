"""The OpenAI-compatible endpoints with the official `openai` client, sync and async."""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from redis import Redis
from sqlalchemy import func, select

from db.session import session_scope
from db.tables import Job
from llmq.events import ErrorEvent, events_key
from llmq.publisher import TokenPublisher
from tests.factories import ADMIN_KEY, AUTH, start_api, stop_worker
from tests.faults import CuttableLink


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


def test_a_non_streamed_completion_publishes_its_text_whole_when_it_ends(
    client, api_server, database_url, redis_url
):
    """Nobody watches a non-streamed request's job token by token: its replay buffer gets the
    text in one token event, then the end, as a stream rebuilt from Postgres would."""
    prompt = f"Once upon a time {uuid.uuid4().hex[:8]}"
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    body["extra_body"] = {"ignore_eos": True, "cache": False}
    whole = client.completions.create(**body).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True))
    assert streamed == whole
    with session_scope(database_url) as session:
        jobs = session.execute(
            select(Job.id, Job.stream_tokens)
            .where(Job.input["prompt"].astext == prompt)
            .order_by(Job.created_at)
        ).all()
    assert [streams for _, streams in jobs] == [False, True]
    (quiet, _), (watched, _) = jobs
    redis = Redis.from_url(redis_url)

    def events(job_id):
        return [(e[b"type"], json.loads(e[b"data"])) for _, e in redis.xrange(events_key(job_id))]

    quiet_events = events(quiet)
    assert [kind for kind, _ in quiet_events] == [b"token", b"done"]
    assert quiet_events[0][1]["text"] == quiet_events[1][1]["text"] == whole
    tokens = [data["text"] for kind, data in events(watched) if kind == b"token"]
    assert len(tokens) > 1 and "".join(tokens) == whole
    replayed = httpx.get(f"{api_server}/v1/jobs/{quiet}/events", headers=AUTH, timeout=30)
    sent = [json.loads(line[5:]) for line in replayed.text.splitlines() if line.startswith("data:")]
    assert [(event["type"], event["text"]) for event in sent] == [("token", whole), ("done", whole)]


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
        client.completions.create(model="tiny-llama", prompt="x", suffix="end")
    assert "suffix" in unsupported.value.body["message"]


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


# Prose, so that tokenizing it costs what a real long prompt costs.
PROSE = "Once upon a time there was a little dog who liked to run in the park. "
LONG_PROMPT_CHARS = 2_000_000  # about a second of tokenizing, or several on a busy machine


@pytest.fixture(scope="module")
def roomy_api(database_url, redis_url, tiny_model_path):
    """An API process that takes prompts of up to 3 million characters."""
    process, base_url = start_api(LLMQ_MAX_PROMPT_CHARS="3000000")
    try:
        yield base_url
    finally:
        stop_worker(process)


def long_body(path: str, chars: int) -> dict:
    text = (PROSE * (chars // len(PROSE) + 1))[:chars]
    if path == "/v1/chat/completions":
        return {"model": "tiny-offline", "messages": [{"role": "user", "content": text}]}
    return {"model": "tiny-offline", "prompt": text, "max_tokens": 1}


def healthz_while(base_url: str, path: str, body: dict) -> tuple[httpx.Response, list[float]]:
    """POST the body and, until it is answered, time /healthz every 50 ms."""
    latencies = []
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=base_url, timeout=60) as probe:
        answer = pool.submit(httpx.post, f"{base_url}{path}", json=body, headers=AUTH, timeout=120)
        while not answer.done():
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        return answer.result(), latencies


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/jobs"])
def test_long_prompt_is_tokenized_off_the_event_loop(roomy_api, path):
    """A 2 MB prompt takes a second or more to tokenize; meanwhile the API goes on answering.
    (It then fails, as it is far over tiny-offline's 128-token context.) The job API shares
    the tokenizer, so it is checked here too."""
    response, latencies = healthz_while(roomy_api, path, long_body(path, LONG_PROMPT_CHARS))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 5, "the prompt was handled too fast to tell anything"
    # Generous, for a shared CI machine (it is a few ms when idle): before, /healthz waited for
    # the whole tokenization.
    assert max(latencies) < 1.0, f"/healthz took up to {max(latencies):.2f} s"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_over_the_size_cap_is_400_with_both_numbers(api_server, path):
    started = time.perf_counter()
    response = httpx.post(
        f"{api_server}{path}", json=long_body(path, 2_000_000), headers=AUTH, timeout=60
    )

    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "prompt_too_large"
    assert error["param"] == ("messages" if "chat" in path else "prompt")
    assert "2,000,000 characters" in error["message"] and "1,000,000" in error["message"]
    assert time.perf_counter() - started < 5  # refused before any tokenizing


def test_stream_pings_from_the_start_while_the_broker_is_away(
    redis_url, database_url, tiny_model_path
):
    """With Redis gone, the job cannot be sent, yet the stream answers at once and sends
    comment pings (every LLMQ_SSE_PING_S) until its first token: the client sees it alive."""
    link = CuttableLink(6379)
    process, base_url = start_api(LLMQ_REDIS_URL=link.url_for(redis_url), LLMQ_SSE_PING_S="1")
    try:
        link.cut()
        body = {"model": "tiny-offline", "prompt": "no broker", "max_tokens": 2, "stream": True}
        started = time.perf_counter()
        with httpx.Client(timeout=10, headers=AUTH) as http:
            with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                answered_s = time.perf_counter() - started
                lines = []
                for line in response.iter_lines():
                    lines.append(line)
                    if sum(line.startswith(":") for line in lines) == 3:
                        break
                pinged_s = time.perf_counter() - started
        assert response.status_code == 200
        assert answered_s < 5, f"the stream began after {answered_s:.1f} s"
        assert not any(line.startswith("data:") for line in lines), lines
        assert pinged_s < 8, f"three pings took {pinged_s:.1f} s"
    finally:
        link.close()
        stop_worker(process)


def test_idempotency_key_gets_the_first_requests_choices(api_server, database_url):
    """A request sent again with its Idempotency-Key (a retry after a lost answer) gets the
    jobs the first one stored, choice by choice, instead of running them again."""
    key = f"retry-{uuid.uuid4().hex}"
    body = {"model": "tiny-llama", "prompt": "Once", "n": 2, "max_tokens": 3, "temperature": 1}
    headers = AUTH | {"Idempotency-Key": key}
    first = httpx.post(f"{api_server}/v1/completions", json=body, headers=headers, timeout=60)
    again = httpx.post(f"{api_server}/v1/completions", json=body, headers=headers, timeout=60)

    assert first.status_code == again.status_code == 200, (first.text, again.text)
    texts = [choice["text"] for choice in first.json()["choices"]]
    assert [choice["text"] for choice in again.json()["choices"]] == texts
    with session_scope(database_url) as session:
        stored = session.scalar(
            select(func.count()).select_from(Job).where(Job.idempotency_key.like(f"{key}:%"))
        )
    assert stored == 2


def test_idempotency_key_of_a_request_with_other_choices_is_refused(api_server):
    """A key first sent with one choice, then with three: a different request under the same
    key is a 409 naming the header, not a second set of jobs (nor a server error)."""
    headers = AUTH | {"Idempotency-Key": f"reused-{uuid.uuid4().hex}"}
    body = {"model": "tiny-llama", "prompt": "Once", "max_tokens": 2}
    url = f"{api_server}/v1/completions"
    first = httpx.post(url, json=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    again = httpx.post(url, json=body | {"n": 3}, headers=headers, timeout=60)
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["param"] == "Idempotency-Key"
    assert "new key" in error["message"]
