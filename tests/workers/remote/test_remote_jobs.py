"""A remote model through the front llmq gives what its upstream (a second llmq) gives when asked
directly: jobs, SSE streams (a late join gets every token), the OpenAI client (streaming or not),
a Batch API file and a GSM8K run; and what llmq does not relay is refused at once."""

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from redis import Redis

from db.session import session_scope
from db.tables import Job, ScoreResult
from llmq.evals import gsm8k
from tests.api.test_batches import chat_line, jsonl, records, wait_for_batch
from tests.api.test_streams import read_events, texts, wait_done
from tests.conftest import REDIS_URL
from tests.evals.conftest import EVAL_DATA_ROOT, write_benchmarks
from tests.evals.test_runs import items_of, start_run, wait_for_run
from tests.factories import (
    ADMIN_KEY,
    AUTH,
    read_samples,
    sample,
    start_worker,
    stop_worker,
    submit,
    wait_for_job,
    wait_for_queue,
)
from tests.workers.remote.conftest import MODEL, QUEUE, UPSTREAM_DATABASE_URL, UPSTREAM_MODEL

PROMPTS = ["Once upon a time", "The little dog", "She found a box"]


@pytest.fixture
def front(api_server, healthy_upstream):
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture
def direct(healthy_upstream):
    base = f"{healthy_upstream.base_url}/v1"
    return openai.OpenAI(base_url=base, api_key=ADMIN_KEY, max_retries=0)


def test_jobs_give_the_upstreams_text_and_usage(client, healthy_upstream):
    jobs = [
        submit(client, model=MODEL, prompt=p, max_tokens=24, ignore_eos=True, cache=False)
        for p in PROMPTS
    ]
    for prompt, job in zip(PROMPTS, jobs, strict=True):
        done = wait_for_job(client, job["id"])
        assert done["status"] == "succeeded", done
        asked = healthy_upstream.complete(prompt=prompt, max_tokens=24, ignore_eos=True)
        assert done["result"]["text"] == asked["choices"][0]["text"]
        assert done["result"]["finish_reason"] == "length"
        usage = done["result"]["usage"]
        assert usage["prompt_tokens"] == asked["usage"]["prompt_tokens"]
        assert usage["completion_tokens"] == asked["usage"]["completion_tokens"] == 24


def test_stream_relays_tokens_and_a_late_join_gets_them_all(api_server, healthy_upstream):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
    job = httpx.post(f"{api_server}/v1/jobs", json=body | {"cache": False}, headers=AUTH).json()
    live = read_events(api_server, job["id"])
    stored = wait_done(api_server, job["id"])["result"]["text"]
    assert live[-1].event == "done"
    tokens = [e for e in live if e.event == "token"]
    assert len(tokens) > 1, "relayed as it came, not in one piece"
    indexes = [json.loads(e.data)["token_index"] for e in tokens]
    # The last events may carry no text (special tokens past EOS decode to nothing): the last
    # token event is the last text's, the done event counts them all.
    assert indexes == sorted(indexes) and indexes[-1] <= 299
    assert json.loads(live[-1].data)["completion_tokens"] == 300
    assert texts(live) == stored
    late = read_events(api_server, job["id"])  # after the job ended: the replay
    assert texts(late) == stored and late[-1].event == "done"
    half = len(tokens) // 2
    resumed = read_events(api_server, job["id"], last_event_id=tokens[half - 1].id)
    assert texts(tokens[:half]) + texts(resumed) == stored
    asked = healthy_upstream.complete(prompt=body["prompt"], max_tokens=300, ignore_eos=True)
    assert stored == asked["choices"][0]["text"]


def test_openai_client_completions_and_chat_match_the_upstream(front, direct):
    question = [{"role": "user", "content": "Tell me a story about a cat."}]
    for stream in (False, True):
        ours = front.chat.completions.create(
            model=MODEL, messages=question, max_tokens=20, temperature=0, stream=stream
        )
        theirs = direct.chat.completions.create(
            model=UPSTREAM_MODEL, messages=question, max_tokens=20, temperature=0
        )
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in ours if c.choices)
        else:
            text = ours.choices[0].message.content
            assert ours.model == MODEL
            assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
        assert text == theirs.choices[0].message.content
    asked = {"prompt": PROMPTS[1], "max_tokens": 12, "stop": ["."], "temperature": 0}
    ours = front.completions.create(model=MODEL, **asked)
    theirs = direct.completions.create(model=UPSTREAM_MODEL, **asked)
    assert ours.choices[0].text == theirs.choices[0].text
    assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason


def test_batch_file_on_the_remote_model(front, direct, api_server):
    lines = [chat_line(f"q{i}", f"Tell me about {i}", model=MODEL) for i in range(3)]
    upload = front.files.create(file=("remote.jsonl", jsonl(lines)), purpose="batch")
    batch = front.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(front, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    for custom_id, record in records(front, batch.output_file_id).items():
        content = record["response"]["body"]["choices"][0]["message"]["content"]
        line = next(line for line in lines if line["custom_id"] == custom_id)
        body = {**line["body"], "model": UPSTREAM_MODEL}
        extra = {"ignore_eos": body.pop("ignore_eos")}  # llmq's and vLLM's, not OpenAI's
        theirs = direct.chat.completions.create(**body, extra_body=extra)
        assert content == theirs.choices[0].message.content


def test_gsm8k_run_on_the_remote_model(client, healthy_upstream, database_url):
    write_benchmarks(EVAL_DATA_ROOT)
    run = start_run(client, {"benchmark": "gsm8k", "model": MODEL, "num_fewshot": 2, "limit": 2})
    run = wait_for_run(client, run["id"])
    for item in items_of(client, run["id"]):
        with session_scope(database_url) as session:
            params = session.get(Job, uuid.UUID(item["job_id"])).params
        asked = healthy_upstream.complete(
            prompt=item["prompt"],
            max_tokens=params["max_tokens"],
            stop=params["stop"],
            truncate_prompt_tokens=params["truncate_prompt_tokens"],
            temperature=0,
        )
        assert params["stop"] == gsm8k.stop_strings("</s>")
        assert item["output"] == asked["choices"][0]["text"]
    assert run["scores"]["metrics"]["exact_match,strict-match"]["n"] == 2


def test_what_is_not_relayed_is_refused_with_400(client, healthy_upstream):
    asked = {"model": MODEL, "prompt": "Once", "max_tokens": 4}
    for extra, param in (
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True, "max_tokens": 0, "logprobs": 0}, None),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        response = client.post("/v1/completions", json=asked | extra)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "tiny-remote is a remote model" in error["message"]
        assert param is None or error["param"] == param
    plain = {"benchmark": "mmlu", "model": "tiny-remote-plain", "limit": 1}
    run = client.post("/v1/evals", json=plain)
    assert run.status_code == 400
    message = run.json()["error"]["message"]
    assert "mmlu scores each answer by its log-likelihood" in message
    assert "remote.prompt_logprobs" in message


def test_mmlu_run_scores_through_the_upstreams_echoed_logprobs(
    client, healthy_upstream, database_url
):
    write_benchmarks(EVAL_DATA_ROOT)
    body = {"benchmark": "mmlu", "num_fewshot": 1, "subjects": ["abstract_algebra", "anatomy"]}
    ours = wait_for_run(client, start_run(client, body | {"model": MODEL})["id"])
    with healthy_upstream.client() as upstream:
        theirs = start_run(upstream, body | {"model": UPSTREAM_MODEL})
        theirs = wait_for_run(upstream, theirs["id"])
        their_items = {i["prompt"]: i for i in items_of(upstream, theirs["id"])}
    our_items = items_of(client, ours["id"])
    assert len(our_items) == len(their_items) == 5
    for item in our_items:
        their = their_items[item["prompt"]]
        ours_scored = _scores(database_url, item["job_id"])
        their_scored = _scores(UPSTREAM_DATABASE_URL, their["job_id"])
        assert ours_scored[0] == pytest.approx(their_scored[0], abs=1e-4)
        assert ours_scored[1] == their_scored[1]  # greedy, continuation by continuation
        assert item["answer"]["prediction"] == their["answer"]["prediction"]
    assert ours["scores"]["metrics"]["acc"] == theirs["scores"]["metrics"]["acc"]


def _scores(database_url: str, job_id: str) -> tuple[list[float], list[bool]]:
    with session_scope(database_url) as session:
        result = session.get(ScoreResult, uuid.UUID(job_id))
        return list(result.loglikelihoods), list(result.greedy)


def test_models_readyz_and_metrics_show_the_breaker(client, healthy_upstream):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[MODEL]["circuit_breaker"] == "closed"
    assert models[MODEL]["queues"] == ["llmq.tiny-remote.remote"]
    assert models["tiny-llama"]["circuit_breaker"] is None
    ready = client.get("/readyz").json()
    remote = {MODEL, "tiny-remote-plain", "tiny-remote-traced"}  # models.remote.yaml's
    assert ready["upstream_circuit_breakers"] == dict.fromkeys(remote, "closed")
    samples = read_samples(client.get("/metrics").text)
    assert sample(samples, "llmq_upstream_circuit_breaker_state", model=MODEL) == 0


def test_remote_worker_loads_no_torch(remote_worker):
    maps = Path(f"/proc/{remote_worker.pid}/maps").read_text()
    assert "libtorch" not in maps, "a remote model's worker loaded torch"


def test_two_workers_share_the_upstreams_concurrency(client, healthy_upstream, database_url):
    """max_concurrency (8) holds for both workers together, and both take jobs."""
    second = start_worker(MODEL, log_name="worker-tiny-remote-2")
    try:
        wait_for_queue(QUEUE, second)
        redis = Redis.from_url(REDIS_URL)
        held: list[int] = []
        ids = [
            submit(client, model=MODEL, prompt=f"shared {i}", max_tokens=200, ignore_eos=True)["id"]
            for i in range(40)
        ]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                held.append(redis.zcard(f"llmq:upstream-slots:{MODEL}"))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            jobs = [wait_for_job(client, job_id, timeout=120) for job_id in ids]
        finally:
            done.set()
            watcher.join(5)
        assert {job["status"] for job in jobs} == {"succeeded"}
        assert max(held) == 8, f"slots held at once: at most {max(held)}"
        with session_scope(database_url) as session:
            workers = {session.get(Job, uuid.UUID(i)).worker.split("@")[0] for i in ids}
        assert len(workers) == 2, workers
    finally:
        stop_worker(second)
