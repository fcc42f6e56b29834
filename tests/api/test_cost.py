"""Cost: prices in models.yaml, each usage row priced when its job finishes (a later price change
rewrites nothing), cost in the usage, stats, job and OpenAI answers and in llmq_cost_total, and
the monthly spend limit.

The API and the worker run as processes of their own on a models file of this module's, which
the tests rewrite to change the price while they run.
"""

import json
import os
import time
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llmq.price_book import PriceBook
from llmq.pricing import Price, format_amount
from llmq.registry import load_registry
from tests.factories import (
    api_client,
    bearer,
    create_key,
    free_port,
    read_samples,
    sample,
    start_api,
    start_worker,
    stop_worker,
    wait_for_job,
    wait_for_queue,
)

MODEL = "tiny-priced"
PRICE_A = {"prompt_per_million": 0.5, "completion_per_million": 1.5, "currency": "USD"}
PRICE_B = {
    "prompt_per_million": 2.25,
    "completion_per_million": 3.1234,
    "cached_per_million": 0.75,
    "currency": "USD",
}


def write_models(path: Path, price: dict | None, model: str = MODEL) -> None:
    """The models file, replaced in one step as an editor or a deploy would."""
    spec = {
        "id": model,
        "source": "builtin:tiny-llama",
        "devices": ["cpu"],
        "max_batch_size": 8,
        "context_length": 128,
        "defaults": {"max_tokens": 6, "temperature": 0.0},
    }
    if price is not None:
        spec["price"] = price
    staged = path.with_suffix(".new")
    staged.write_text(yaml.safe_dump({"models": [spec]}))
    os.replace(staged, path)


def cost_at(price: dict, job: dict) -> Decimal:
    """What a finished job costs at `price`, worked out here from its tokens."""
    usage = job["result"]["usage"]
    if job["cache_hit"] or job["follows_job_id"]:
        per_million = Decimal(str(price.get("cached_per_million", 0)))
        return (usage["total_tokens"] * per_million) / 1_000_000
    prompt = usage["prompt_tokens"] * Decimal(str(price["prompt_per_million"]))
    completion = usage["completion_tokens"] * Decimal(str(price["completion_per_million"]))
    return (prompt + completion) / 1_000_000


@pytest.fixture(scope="module")
def priced(database_url, redis_url, tiny_model_path, tmp_path_factory):
    """(API base URL, models file, worker metrics URL): an API and a worker of MODEL."""
    models = tmp_path_factory.mktemp("cost") / "models.yaml"
    write_models(models, PRICE_A)
    metrics_port = free_port()
    worker = start_worker(
        MODEL, LLMQ_MODELS_FILE=str(models), LLMQ_WORKER_METRICS_PORT=str(metrics_port)
    )
    try:
        wait_for_queue(f"llmq.{MODEL}.cpu", worker)
        api, base_url = start_api(LLMQ_MODELS_FILE=str(models))
        try:
            yield base_url, models, f"http://127.0.0.1:{metrics_port}/metrics"
        finally:
            stop_worker(api)
    finally:
        stop_worker(worker)


def run_mixed(client, key: dict, tag: str, repeat: str) -> None:
    """Jobs, completions (one streamed) and chat, all finished before this returns, and a
    cache hit of `repeat`, a prompt that ran before."""
    for prompt in (f"{tag} the first job", f"{tag} and a second, longer prompt for the model"):
        job = client.post("/v1/jobs", json={"model": MODEL, "prompt": prompt}, headers=key)
        assert job.status_code == 202, job.text
        wait_for_job(client, job.json()["id"])
    completion = {"model": MODEL, "prompt": f"{tag} completion", "max_tokens": 5}
    answer = client.post("/v1/completions", json=completion, headers=key)
    assert answer.status_code == 200, answer.text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"{tag} chat"}]}
    answer = client.post("/v1/chat/completions", json=chat | {"max_tokens": 4}, headers=key)
    assert answer.status_code == 200, answer.text
    streamed = completion | {
        "prompt": f"{tag} streamed",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=streamed, headers=key) as stream:
        assert stream.status_code == 200
        chunks = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
    assert chunks[-1] == "[DONE]"
    assert "cost" in json.loads(chunks[-2])["usage"]
    hit = client.post("/v1/jobs", json={"model": MODEL, "prompt": repeat}, headers=key)
    assert hit.status_code == 202 and hit.json()["cache_hit"], hit.text


def jobs_of(client, key: dict) -> dict[str, dict]:
    page = client.get("/v1/jobs", params={"limit": 100}, headers=key).json()
    return {job["id"]: job for job in page["data"]}


def cost_total(samples) -> float:
    return sample(samples, "llmq_cost_total", model=MODEL, currency="USD")


def test_cost_matches_tokens_times_the_price_in_force_across_a_price_change(priced):
    base_url, models, worker_metrics = priced
    with api_client(base_url, timeout=60) as client:
        before = cost_total(read_samples(client.get("/metrics").text))
        before += cost_total(read_samples(client.get(worker_metrics).text))
        created = create_key(client, "mixed run")
        key = bearer(created["key"])

        run_mixed(client, key, "first", repeat="first the first job")
        first = jobs_of(client, key)
        write_models(models, PRICE_B)
        run_mixed(client, key, "second", repeat="first and a second, longer prompt for the model")
        second = {i: job for i, job in jobs_of(client, key).items() if i not in first}

        assert len(first) == len(second) == 6
        assert sum(job["cache_hit"] for job in (*first.values(), *second.values())) == 2
        expected = Decimal(0)
        for price, jobs in ((PRICE_A, first), (PRICE_B, second)):
            for job in jobs.values():
                assert job["status"] == "succeeded"
                cost = cost_at(price, job)
                # Each job shows its own cost, at the price of the moment it finished.
                assert job["result"]["usage"]["cost"] == {
                    "amount": format_amount(cost),
                    "currency": "USD",
                }
                expected += cost
        assert expected > 0
        total = {"amount": format_amount(expected), "currency": "USD"}

        mine = client.get("/v1/me/usage", headers=key).json()
        assert mine["total"]["cost"] == [total]
        assert mine["by_model"][0]["model"] == MODEL
        assert mine["by_model"][0]["cost"] == [total]
        assert mine["spend"]["spent_this_month"] == total["amount"]
        assert mine["spend"]["remaining"] is None  # no spend limit

        everyone = client.get("/v1/admin/usage").json()
        [row] = [row for row in everyone["data"] if row["key_id"] == created["id"]]
        assert row["cost"] == [total]

        stats = client.get("/v1/stats", params={"model": MODEL}).json()
        assert stats["data"][0]["cost"] == [total]

        # The API counts the cache hits it answered, the worker what it ran; together, all.
        after = cost_total(read_samples(client.get("/metrics").text))
        after += cost_total(read_samples(client.get(worker_metrics).text))
        assert after - before == pytest.approx(float(expected), rel=1e-9)


def test_openai_usage_carries_the_cost_of_the_request(priced):
    base_url, models, _ = priced
    with api_client(base_url, timeout=60) as client:
        key = bearer(create_key(client, "openai cost")["key"])
        body = {"model": MODEL, "prompt": "the cost of a completion", "max_tokens": 5}
        body["temperature"] = 0  # deterministic: its repeat is a cache hit
        usage = client.post("/v1/completions", json=body, headers=key).json()["usage"]
        [job] = jobs_of(client, key).values()
        price = yaml.safe_load(models.read_text())["models"][0]["price"]
        cost = format_amount(cost_at(price, job))
        assert usage["cost"] == {"amount": cost, "currency": "USD"}
        assert usage["prompt_tokens"] == job["result"]["usage"]["prompt_tokens"]

        # The same request again is answered from the cache, at the cached price: its final
        # event is rebuilt, not a worker's, and its cost is read from its usage row.
        again = client.post("/v1/completions", json=body, headers=key).json()["usage"]
        [hit] = [j for j in jobs_of(client, key).values() if j["id"] != job["id"]]
        assert hit["cache_hit"]
        assert again["cost"] == {"amount": format_amount(cost_at(price, hit)), "currency": "USD"}


def test_a_waited_job_shows_its_cost_as_stored(priced):
    """POST /v1/jobs?wait answers from the job's final event: its cost is the usage row's."""
    base_url, models, _ = priced
    with api_client(base_url, timeout=60) as client:
        key = bearer(create_key(client, "waited cost")["key"])
        body = {"model": MODEL, "prompt": "a waited job, priced", "max_tokens": 6}
        job = client.post("/v1/jobs", params={"wait": 30}, json=body, headers=key).json()
        assert job["status"] == "succeeded", job
        price = yaml.safe_load(models.read_text())["models"][0]["price"]
        cost = {"amount": format_amount(cost_at(price, job)), "currency": "USD"}
        assert job["result"]["usage"]["cost"] == cost
        assert client.get(f"/v1/jobs/{job['id']}", headers=key).json() == job


def assert_spend_limit_reached(response, spent: str, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert (
        f"monthly spend limit reached: this key has spent {spent} USD of its {limit} USD in "
        in error["message"]
    )
    assert response.headers["x-should-retry"] == "false"


def test_spend_limit_refuses_new_work_once_reached(priced):
    base_url, models, _ = priced
    # Dear enough that one job of 8 generated tokens costs more than the limit.
    write_models(
        models, {"prompt_per_million": 100, "completion_per_million": 1000, "currency": "USD"}
    )
    with api_client(base_url, timeout=60) as client:
        created = create_key(client, "small spend", monthly_spend_limit="0.0050")
        assert created["monthly_spend_limit"] == created["limits"]["monthly_spend_limit"]
        assert created["monthly_spend_limit"] == "0.005"
        key = bearer(created["key"])
        body = {"model": MODEL, "prompt": "spend it all", "max_tokens": 8, "ignore_eos": True}
        first = client.post("/v1/jobs", json=body, headers=key)
        assert first.status_code == 202, first.text
        spent = wait_for_job(client, first.json()["id"])["result"]["usage"]["cost"]["amount"]
        assert Decimal(spent) >= Decimal("0.008")

        again = client.post("/v1/jobs", json=body | {"prompt": "more"}, headers=key)
        assert_spend_limit_reached(again, spent, "0.005")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert_spend_limit_reached(
            client.post("/v1/chat/completions", json=chat, headers=key), spent, "0.005"
        )
        mine = client.get("/v1/me/usage", headers=key).json()["spend"]
        assert mine == {
            "currency": "USD",
            "monthly_spend_limit": "0.005",
            "spent_this_month": spent,
            "remaining": "0",
        }

        raised = client.patch(f"/v1/admin/keys/{created['id']}", json={"monthly_spend_limit": 1})
        assert raised.status_code == 200 and raised.json()["monthly_spend_limit"] == "1"
        assert client.post("/v1/jobs", json=body, headers=key).status_code == 202


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (-1, "greater than or equal to 0"),
        ("0.00001", "'0.00001' is not an amount: send up to 12 digits, and at most 4 after"),
        ("ten", "'ten' is not an amount"),
        (12.5, 'send a fractional monthly_spend_limit as a string, e.g. "12.5"'),
        (True, "must be an amount"),
    ],
)
def test_a_bad_spend_limit_is_400(client, limit, message):
    answer = client.post("/v1/admin/keys", json={"name": "bad", "monthly_spend_limit": limit})
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]


def test_prices_are_validated(tmp_path):
    path = tmp_path / "models.yaml"
    bad = [
        ({"prompt_per_million": -1, "completion_per_million": 1, "currency": "USD"}, "0"),
        ({"prompt_per_million": 1, "completion_per_million": 1, "currency": "usd"}, "A-Z"),
        ({"prompt_per_million": 0.00001, "completion_per_million": 1, "currency": "EUR"}, "4"),
        ({"prompt_per_million": 1, "completion_per_million": 1}, "currency"),
    ]
    for price, word in bad:
        write_models(path, price)
        with pytest.raises(ValidationError, match=word):
            load_registry(path)


def test_priced_models_must_share_one_currency(tmp_path):
    path = tmp_path / "models.yaml"
    spec = {"source": "builtin:tiny-llama"}
    path.write_text(
        yaml.safe_dump(
            {
                "models": [
                    spec | {"id": "a", "price": PRICE_A},
                    spec | {"id": "b", "price": PRICE_A | {"currency": "EUR"}},
                ]
            }
        )
    )
    with pytest.raises(ValidationError, match=r"share one currency.*EUR: b; USD: a"):
        load_registry(path)


def test_price_book_follows_the_file_and_keeps_prices_through_a_broken_edit(tmp_path):
    path = tmp_path / "models.yaml"
    write_models(path, PRICE_A)
    book = PriceBook(path)
    assert book.price(MODEL) == Price.model_validate(PRICE_A)
    assert book.currency == "USD"
    write_models(path, PRICE_B)
    assert book.price(MODEL) == Price.model_validate(PRICE_B)
    path.write_text("models: [ {id: half-saved")  # not YAML: the prices stay
    time.sleep(0.01)
    assert book.price(MODEL) == Price.model_validate(PRICE_B)
    write_models(path, None)
    assert book.price(MODEL) is None and book.currency is None


def test_cost_is_exact_decimal():
    price = Price.model_validate(PRICE_B)
    # 7 × 2.25 + 3 × 3.1234 = 25.1202 per million tokens.
    assert price.cost(7, 3, cached=False) == Decimal("0.0000251202")
    assert price.cost(7, 3, cached=True) == Decimal("0.0000075")
    assert format_amount(Decimal("0.0000075000")) == "0.0000075"
    assert format_amount(Decimal("12.000")) == "12"
