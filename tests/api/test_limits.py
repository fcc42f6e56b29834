"""Per-key limits: requests per minute in Redis (headers, 429, shared by two API processes), jobs
queued or running at once, and the monthly token quota; per-key overrides and their changes."""

import time
import uuid

import openai
import pytest

from tests.evals.conftest import EVAL_DATA_ROOT, write_benchmarks
from tests.factories import (
    api_client,
    bearer,
    create_key,
    record_usage,
    start_api,
    stop_worker,
    submit,
    wait_for_job,
)
from tests.faults import CuttableLink

OFFLINE_JOB = {"model": "tiny-offline", "prompt": "waits in the queue", "max_tokens": 2}


@pytest.fixture
def whole_minute():
    """Start a test that counts requests early in a rate-limit window (they are aligned to the
    minute), so that its requests all fall in one window."""
    left = 60 - time.time() % 60
    if left < 20:
        time.sleep(left + 0.2)


def limit_headers(response) -> tuple[int, int, int]:
    headers = response.headers
    return (
        int(headers["X-RateLimit-Limit"]),
        int(headers["X-RateLimit-Remaining"]),
        int(headers["X-RateLimit-Reset"]),
    )


def assert_rate_limited(response, limit: int) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert f"this key may send {limit:,} requests per minute" in error["message"]
    _, remaining, reset = limit_headers(response)
    assert remaining == 0 and 1 <= reset <= 60
    assert int(response.headers["Retry-After"]) == reset


@pytest.mark.usefixtures("whole_minute")
def test_every_answer_carries_the_rate_limit_headers(client):
    key = bearer(create_key(client, "headers", rate_limit_per_minute=50)["key"])
    job = submit(client, key, **OFFLINE_JOB)
    answers = [
        client.get(f"/v1/jobs/{job['id']}", headers=key),  # 200
        client.get(f"/v1/jobs/{uuid.uuid4()}", headers=key),  # 404
        client.post("/v1/jobs", json={"model": "tiny-offline"}, headers=key),  # 400
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=key),  # 200
        client.get(f"/v1/jobs/{job['id']}/events", headers=key),  # an event stream
    ]
    assert [a.status_code for a in answers] == [200, 404, 400, 200, 200]
    assert answers[-1].headers["content-type"].startswith("text/event-stream")
    figures = [limit_headers(a) for a in answers]
    assert [f[0] for f in figures] == [50] * 5
    assert [f[1] for f in figures] == [48, 47, 46, 45, 44]  # the submit counted first
    assert all(1 <= f[2] <= 60 for f in figures)


def test_a_key_without_a_rate_limit_gets_no_headers(client):
    key = bearer(create_key(client, "unlimited", rate_limit_per_minute=0)["key"])
    response = client.get("/v1/jobs", headers=key)
    assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers


@pytest.mark.usefixtures("whole_minute")
def test_requests_past_the_rate_limit_get_429_with_retry_after(client):
    key = bearer(create_key(client, "three a minute", rate_limit_per_minute=3)["key"])
    answers = [client.get("/v1/models", headers=key) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert [limit_headers(a)[1] for a in answers] == [2, 1, 0]
    assert_rate_limited(client.get("/v1/models", headers=key), 3)
    assert_rate_limited(client.post("/v1/jobs", json=OFFLINE_JOB, headers=key), 3)


@pytest.mark.usefixtures("whole_minute")
def test_rate_limit_holds_across_two_api_processes(client, worker):
    """Both processes default to 4 requests a minute; they count in the same Redis."""
    key = bearer(create_key(client, "two processes")["key"])  # no limit of its own
    first, first_url = start_api(LLMQ_RATE_LIMIT_PER_MINUTE="4")
    second, second_url = start_api(LLMQ_RATE_LIMIT_PER_MINUTE="4")
    try:
        with api_client(first_url, headers=key) as a, api_client(second_url, headers=key) as b:
            answers = [a.get("/v1/jobs"), b.get("/v1/jobs"), a.get("/v1/jobs"), b.get("/v1/jobs")]
            assert [r.status_code for r in answers] == [200] * 4
            assert [limit_headers(r)[:2] for r in answers] == [(4, 3), (4, 2), (4, 1), (4, 0)]
            assert_rate_limited(a.get("/v1/jobs"), 4)
            assert_rate_limited(b.get("/v1/jobs"), 4)
    finally:
        stop_worker(first)
        stop_worker(second)


def test_requests_go_uncounted_while_redis_is_away(client, worker, redis_url):
    key = bearer(create_key(client, "redis away", rate_limit_per_minute=100)["key"])
    link = CuttableLink(6379)
    api, base = start_api(LLMQ_REDIS_URL=link.url_for(redis_url))
    try:
        with api_client(base, headers=key, timeout=30) as http:
            assert limit_headers(http.get("/v1/jobs"))[:2] == (100, 99)
            link.cut()
            answers = [http.get("/v1/jobs") for _ in range(3)]
            assert [a.status_code for a in answers] == [200] * 3
            assert all("X-RateLimit-Limit" not in a.headers for a in answers)
    finally:
        link.close()
        stop_worker(api)


def test_jobs_past_the_concurrency_limit_get_429(client):
    key = bearer(create_key(client, "two at once", max_concurrent_jobs=2)["key"])
    jobs = [submit(client, key, **OFFLINE_JOB) for _ in range(2)]

    refused = client.post("/v1/jobs", json=OFFLINE_JOB, headers=key)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "concurrent_jobs_exceeded"
    assert error["message"] == (
        "this key has 2 jobs queued or running and may have 2 at once; this request adds 1. "
        "Wait for some to finish, or cancel some."
    )
    completion = {"model": "tiny-offline", "prompt": "x", "max_tokens": 2}
    assert client.post("/v1/completions", json=completion, headers=key).status_code == 429

    client.post(f"/v1/jobs/{jobs[0]['id']}/cancel", headers=key).raise_for_status()
    # One place is free: a request for two choices does not fit, one job does.
    two_choices = client.post("/v1/completions", json=completion | {"n": 2}, headers=key)
    assert two_choices.status_code == 429
    assert "this request adds 2" in two_choices.json()["error"]["message"]
    assert client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 202
    for job in client.get("/v1/jobs", headers=key).json()["data"]:
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)


def test_changed_limits_apply_at_once(client):
    created = create_key(client, "patched", max_concurrent_jobs=1)
    key = bearer(created["key"])
    submit(client, key, **OFFLINE_JOB)
    assert client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 429

    patched = client.patch(f"/v1/admin/keys/{created['id']}", json={"max_concurrent_jobs": 2})
    assert patched.json()["limits"]["max_concurrent_jobs"] == 2
    assert client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 202
    assert client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 429

    # null: back to the server's default, which is no limit in the suite
    client.patch(f"/v1/admin/keys/{created['id']}", json={"max_concurrent_jobs": None})
    assert client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 202
    for job in client.get("/v1/jobs", headers=key).json()["data"]:
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)


def assert_quota_spent(response, used: int, quota: int) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert f"this key has used {used:,} of its {quota:,} tokens in " in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert int(response.headers["Retry-After"]) > 0


def test_spent_monthly_quota_refuses_new_work(live_client):
    created = create_key(live_client, "small quota", monthly_token_quota=20)
    key = bearer(created["key"])
    job = submit(live_client, key, prompt="Once upon a time", max_tokens=16, ignore_eos=True)
    usage = wait_for_job(live_client, job["id"])["result"]["usage"]
    used = usage["total_tokens"]
    assert used >= 20

    assert_quota_spent(live_client.post("/v1/jobs", json=OFFLINE_JOB, headers=key), used, 20)
    completion = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2}
    assert_quota_spent(live_client.post("/v1/completions", json=completion, headers=key), used, 20)
    run = {"benchmark": "gsm8k", "model": "tiny-offline", "limit": 1}
    assert_quota_spent(live_client.post("/v1/evals", json=run, headers=key), used, 20)
    # Reading is still allowed.
    assert live_client.get(f"/v1/jobs/{job['id']}", headers=key).status_code == 200

    live_client.patch(f"/v1/admin/keys/{created['id']}", json={"monthly_token_quota": used + 1})
    assert live_client.post("/v1/jobs", json=OFFLINE_JOB, headers=key).status_code == 202


def test_cached_tokens_do_not_count_toward_the_quota(client, database_url):
    created = create_key(client, "cache hits are free", monthly_token_quota=100)
    record_usage(database_url, created["id"], 40, 40, cached=True)
    record_usage(database_url, created["id"], 30, 29)
    key = bearer(created["key"])
    job = submit(client, key, **OFFLINE_JOB)  # 59 of 100 spent
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
    record_usage(database_url, created["id"], 1, 40)
    assert_quota_spent(client.post("/v1/jobs", json=OFFLINE_JOB, headers=key), 100, 100)


@pytest.mark.usefixtures("whole_minute")
def test_openai_client_stops_at_a_spent_quota_without_retrying(api_server, client, database_url):
    created = create_key(client, "openai quota", monthly_token_quota=10, rate_limit_per_minute=50)
    record_usage(database_url, created["id"], 5, 5)
    sdk = openai.OpenAI(base_url=f"{api_server}/v1", api_key=created["key"], max_retries=3)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
    assert raised.value.code == "insufficient_quota"
    assert "used 10 of its 10 tokens" in raised.value.message
    # One request reached the API: the client honoured x-should-retry.
    assert limit_headers(raised.value.response)[1] == 49


def test_an_eval_run_keeps_its_jobs_within_the_key_limits(client, database_url):
    write_benchmarks(EVAL_DATA_ROOT)
    created = create_key(client, "eval", max_concurrent_jobs=1, monthly_token_quota=50)
    key = bearer(created["key"])
    body = {"benchmark": "mmlu", "model": "tiny-offline", "num_fewshot": 0, "subjects": ["anatomy"]}
    run = client.post("/v1/evals", json=body, headers=key).json()
    deadline = time.monotonic() + 30
    while (jobs := client.get("/v1/jobs", headers=key).json())["total"] == 0:
        assert time.monotonic() < deadline, "the run's jobs never appeared"
        time.sleep(0.1)
    # Two items, but the run fed one job: the key may have one at once.
    assert jobs["total"] == 1 and jobs["data"][0]["status"] == "queued"
    assert client.get(f"/v1/evals/{run['id']}", headers=key).json()["progress"]["total"] == 2

    record_usage(database_url, created["id"], 25, 25)  # the key's quota is now spent
    while (state := client.get(f"/v1/evals/{run['id']}", headers=key).json())["status"] != "failed":
        assert time.monotonic() < deadline + 30, f"run still {state['status']}"
        time.sleep(0.1)
    assert "monthly token quota spent: this key has used 50 of its 50 tokens" in state["error"]
    client.post(f"/v1/jobs/{jobs['data'][0]['id']}/cancel", headers=key)
