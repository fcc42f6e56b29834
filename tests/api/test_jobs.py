"""The job API end to end: API → Postgres → Redis queue → real worker → Postgres → poll."""

import json
import threading
import time
import uuid
from contextlib import contextmanager

from redis import Redis
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.factories import submit, wait_for_job


def test_submit_job_succeeds_with_text_and_token_counts(live_client, tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = "Once upon a time"
    job = submit(live_client, prompt=prompt, max_tokens=12, ignore_eos=True)
    assert job["status"] == "queued"
    assert job["queue"] == "llmq.tiny-llama.cpu"

    done = wait_for_job(live_client, job["id"])

    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["finish_reason"] == "length"
    assert result["usage"]["prompt_tokens"] == len(tokenizer(prompt).input_ids)
    assert result["usage"]["completion_tokens"] == 12
    assert result["usage"]["total_tokens"] == len(tokenizer(prompt).input_ids) + 12
    assert result["text"]
    assert done["attempts"] == 1
    assert done["started_at"] and done["finished_at"]


def test_submit_job_matches_transformers_generate(live_client, tiny_model_path):
    """The worker's greedy text is what Transformers' own generate gives for the prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    prompt = "The quick brown fox"
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    expected = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)

    job = submit(live_client, prompt=prompt, max_tokens=10, ignore_eos=True)

    assert wait_for_job(live_client, job["id"])["result"]["text"] == expected


def test_same_prompt_greedy_gives_same_text(live_client):
    jobs = [submit(live_client, prompt="Lily liked to play", max_tokens=16) for _ in range(3)]
    texts = {wait_for_job(live_client, j["id"])["result"]["text"] for j in jobs}
    assert len(texts) == 1


def test_stop_string_ends_job_without_the_stop_text(live_client):
    free = wait_for_job(
        live_client, submit(live_client, prompt="A queue", max_tokens=20, ignore_eos=True)["id"]
    )["result"]["text"]
    stop = free[5:7]
    job = submit(live_client, prompt="A queue", max_tokens=20, stop=[stop], ignore_eos=True)
    result = wait_for_job(live_client, job["id"])["result"]
    assert result["finish_reason"] == "stop"
    assert result["text"] == free[: free.find(stop)]


def test_read_job_unknown_id_is_404(client):
    missing = uuid.uuid4()
    response = client.get(f"/v1/jobs/{missing}")
    assert response.status_code == 404
    assert str(missing) in response.json()["error"]["message"]


def test_read_job_malformed_id_is_400(client):
    response = client.get("/v1/jobs/not-a-uuid")
    assert response.status_code == 400
    assert "must be a UUID" in response.json()["error"]["message"]


def test_list_jobs_filters_by_status_and_model_and_pages(live_client):
    ids = {submit(live_client, prompt=f"page {i}", max_tokens=2)["id"] for i in range(3)}
    for job_id in ids:
        wait_for_job(live_client, job_id)

    page = live_client.get(
        "/v1/jobs", params={"status": "succeeded", "model": "tiny-llama", "limit": 2}
    ).json()
    assert page["limit"] == 2 and len(page["data"]) == 2
    assert page["total"] >= 3
    assert all(j["status"] == "succeeded" and j["model"] == "tiny-llama" for j in page["data"])
    rest = live_client.get(
        "/v1/jobs",
        params={"status": "succeeded", "model": "tiny-llama", "limit": 500, "offset": 2},
    ).json()
    assert len(rest["data"]) == page["total"] - 2
    assert not {j["id"] for j in page["data"]} & {j["id"] for j in rest["data"]}


def test_list_jobs_unknown_status_is_400(client):
    response = client.get("/v1/jobs", params={"status": "done"})
    assert response.status_code == 400
    assert "status" in response.json()["error"]["message"]


def test_cancel_finished_job_is_409(live_client):
    job = submit(live_client, prompt="finish me", max_tokens=2)
    wait_for_job(live_client, job["id"])
    response = live_client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409
    assert "already succeeded" in response.json()["error"]["message"]


def test_idempotency_key_returns_the_same_job(client, database_url):
    key = f"key-{uuid.uuid4()}"
    first = client.post(
        "/v1/jobs", json={"model": "tiny-offline", "prompt": "hi"}, headers={"Idempotency-Key": key}
    )
    second = client.post(
        "/v1/jobs", json={"model": "tiny-offline", "prompt": "hi"}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


def test_prompt_over_the_size_cap_is_400_with_both_numbers(client):
    prompt = "word " * 400_001  # 2,000,005 characters; the default cap is 1,000,000

    response = client.post("/v1/jobs", json={"model": "tiny-offline", "prompt": prompt})

    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "prompt_too_large" and error["param"] == "prompt"
    assert "2,000,005 characters" in error["message"] and "1,000,000" in error["message"]


def test_read_job_with_wait_answers_once_the_job_has_ended(live_client):
    job = submit(live_client, prompt="Wait for me", max_tokens=24, ignore_eos=True)
    started = time.monotonic()
    response = live_client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"]["usage"]["completion_tokens"] == 24
    assert time.monotonic() - started < 20  # answered when it ended, not at the limit


def test_submit_with_wait_answers_with_the_finished_job(live_client):
    """One request instead of a submit and a long-polling read; the job is the one stored."""
    body = {"model": "tiny-llama", "prompt": "Wait with me", "max_tokens": 10, "ignore_eos": True}
    response = live_client.post("/v1/jobs", params={"wait": 30}, json=body)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "succeeded", job
    assert job["result"]["usage"]["completion_tokens"] == 10
    assert live_client.get(f"/v1/jobs/{job['id']}").json() == job


@contextmanager
def statements_run():
    """(statement, parameters) of every SQL statement this process runs meanwhile."""
    seen = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def reads_of(job_id: str, statements) -> list[str]:
    """The SELECTs among `statements` that asked for the job by its id."""
    wanted = uuid.UUID(job_id)
    return [
        statement
        for statement, parameters in statements
        if statement.lstrip().upper().startswith("SELECT")
        and isinstance(parameters, dict)
        and wanted in parameters.values()
    ]


def test_a_waited_job_is_answered_from_its_final_event_as_a_read_would_show_it(live_client):
    """The worker that stored the job sends what a read shows of its end (attempts, times,
    timings, cost) with its final event: the waiting request reads nothing back, and its answer
    is the stored job's, field for field. The stream's done event does not carry it."""
    # Long enough that its final event cannot come before the request watches for it (one that
    # came unwatched is looked for in the replay buffer, and the job read back).
    body = {
        "model": "tiny-llama",
        "prompt": "Answer me whole",
        "max_tokens": 48,
        "ignore_eos": True,
    }
    with statements_run() as statements:
        response = live_client.post("/v1/jobs", params={"wait": 30}, json=body)
    job = response.json()
    assert job["status"] == "succeeded", job
    assert reads_of(job["id"], statements) == []
    assert live_client.get(f"/v1/jobs/{job['id']}").json() == job
    assert job["attempts"] == 1 and job["started_at"] <= job["finished_at"]
    assert job["result"]["duration_ms"] > 0

    lines = live_client.get(f"/v1/jobs/{job['id']}/events").text.splitlines()
    [done] = [
        json.loads(data.removeprefix("data: "))
        for kind, data in zip(lines, lines[1:], strict=False)
        if kind.strip() == "event: done"
    ]
    assert done["status"] == "succeeded" and done["text"] == job["result"]["text"]
    assert "ending" not in done


def test_a_waited_job_that_ends_otherwise_is_read_back(live_client, app):
    """A cancellation's final event tells only that it ended: the answer is read back."""
    body = {"model": "tiny-offline", "prompt": "cancel me while I wait", "max_tokens": 2}
    job = live_client.post("/v1/jobs", json=body).json()
    waited: dict = {}

    def wait_for_it():
        waited["answer"] = live_client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})

    waiter = threading.Thread(target=wait_for_it)
    with statements_run() as statements:
        waiter.start()
        deadline = time.monotonic() + 10
        while not app.state.event_reader.finals.watching(uuid.UUID(job["id"])):
            assert time.monotonic() < deadline, "the request never began to wait"
            time.sleep(0.02)
        assert live_client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        waiter.join(30)
    answer = waited["answer"].json()
    assert answer["status"] == "cancelled", answer
    assert answer == live_client.get(f"/v1/jobs/{job['id']}").json()
    assert len(reads_of(job["id"], statements)) >= 2  # before the wait, and after it


def replay_buffer_reads(redis_url: str) -> int:
    """XREVRANGE calls on the Redis server so far: the API's look for a job's newest event."""
    stats = Redis.from_url(redis_url).info("commandstats")
    return stats.get("cmdstat_xrevrange", {}).get("calls", 0)


def test_a_request_waiting_for_jobs_it_just_stored_reads_no_replay_buffer(live_client, redis_url):
    """Their final events cannot come before the request watches for them, while the API's
    final-event subscription stands (api/results/final_events.py); a wait for a job stored
    earlier looks in its buffer first."""
    before = replay_buffer_reads(redis_url)
    body = {"model": "tiny-llama", "prompt": "Mine alone", "max_tokens": 4, "ignore_eos": True}
    job = live_client.post("/v1/jobs", params={"wait": 30}, json=body).json()
    assert job["status"] == "succeeded", job
    completion = live_client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "Mine too", "max_tokens": 4}
    )
    assert completion.status_code == 200, completion.text
    assert replay_buffer_reads(redis_url) == before
    body = {"model": "tiny-offline", "prompt": "nobody serves me", "max_tokens": 2}
    queued = live_client.post("/v1/jobs", json=body).json()
    try:
        assert live_client.get(f"/v1/jobs/{queued['id']}", params={"wait": 0.3}).status_code == 200
        assert replay_buffer_reads(redis_url) > before
    finally:
        live_client.post(f"/v1/jobs/{queued['id']}/cancel")


def test_submit_with_wait_gives_up_after_wait_seconds_and_the_job_stays_queued(client):
    body = {"model": "tiny-offline", "prompt": "no worker serves me either", "max_tokens": 2}
    started = time.monotonic()
    response = client.post("/v1/jobs", params={"wait": 1.5}, json=body)
    waited = time.monotonic() - started
    job = response.json()
    try:
        assert response.status_code == 202 and job["status"] == "queued"
        assert 1.4 <= waited < 5
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    for wait in ("-1", "61", "soon"):
        response = client.post("/v1/jobs", params={"wait": wait}, json=body)
        assert 400 <= response.status_code < 500 and "wait" in response.text


def test_read_job_with_wait_gives_up_after_wait_seconds(client):
    job = submit(client, model="tiny-offline", prompt="no worker serves me", max_tokens=2)
    try:
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{job['id']}", params={"wait": 1.5})
        waited = time.monotonic() - started
        assert response.status_code == 200 and response.json()["status"] == "queued"
        assert 1.4 <= waited < 5
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_read_job_wait_out_of_range_is_a_clear_4xx(client):
    job_id = submit(client, model="tiny-offline", prompt="bounds", max_tokens=2)["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    for wait in ("-1", "61", "soon"):
        response = client.get(f"/v1/jobs/{job_id}", params={"wait": wait})
        assert 400 <= response.status_code < 500
        assert "wait" in response.text
