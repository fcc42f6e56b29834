"""Usage accounting: a key's tokens by model and by UTC day over a period (`/v1/me/usage`), and
everyone's by key (`/v1/admin/usage`)."""

from datetime import UTC, date, datetime, time, timedelta
from time import sleep

import pytest

from tests.factories import bearer, create_key, record_usage, submit, wait_for_job

# A test that counts by today's date starts no later than this before the day ends.
DAY_END_MARGIN_S = 60.0


def at(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), UTC)


def totals(jobs: int, prompt: int, completion: int, cached: int = 0) -> dict:
    return {
        "jobs": jobs,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "cost": [],  # tiny-llama has no price
    }


@pytest.fixture
def today() -> date:
    """Today's UTC date, for a test that ends within it: the API dates what it counts by the
    clock when it counts, so a test that would start in the day's last minute waits for the
    next day first."""
    now = datetime.now(UTC)
    left_s = (datetime.combine(now.date() + timedelta(days=1), time(), UTC) - now).total_seconds()
    if left_s < DAY_END_MARGIN_S:
        sleep(left_s + 0.5)
    return datetime.now(UTC).date()


@pytest.fixture
def user(client) -> dict:
    return create_key(client, "usage", monthly_token_quota=1000)


def test_my_usage_counts_a_finished_job(live_client, user, today):
    key = bearer(user["key"])
    job = submit(live_client, key, prompt="count me", max_tokens=5, ignore_eos=True)
    used = wait_for_job(live_client, job["id"])["result"]["usage"]

    usage = live_client.get("/v1/me/usage", headers=key).json()
    expected = totals(1, used["prompt_tokens"], used["completion_tokens"])
    assert usage["key_id"] == user["id"]
    assert usage["start"] == today.replace(day=1).isoformat()
    assert usage["end"] == today.isoformat()
    assert usage["total"] == expected
    assert usage["by_model"] == [{"model": "tiny-llama", **expected}]
    assert usage["by_day"] == [{"date": today.isoformat(), **expected}]
    assert usage["quota"] == {
        "monthly_token_quota": 1000,
        "used_this_month": used["total_tokens"],
        "remaining": 1000 - used["total_tokens"],
    }


def test_my_usage_by_model_and_day_over_a_period(client, user, database_url):
    owner = user["id"]
    start = date(2025, 3, 30)
    record_usage(database_url, owner, 10, 5, model="tiny-llama", at=at(start - timedelta(days=1)))
    record_usage(database_url, owner, 1, 2, model="tiny-llama", at=at(start, 0, 0))
    record_usage(database_url, owner, 3, 4, model="tiny-evals", at=at(start, 23, 59))
    record_usage(database_url, owner, 5, 6, model="tiny-llama", cached=True, at=at(start))
    record_usage(database_url, owner, 7, 8, model="tiny-llama", at=at(date(2025, 4, 1), 23, 59))
    record_usage(database_url, owner, 99, 99, at=at(date(2025, 4, 2), 0, 0))  # after the end
    record_usage(database_url, create_key(client, "someone else")["id"], 50, 50, at=at(start))

    period = {"start": "2025-03-30", "end": "2025-04-01"}
    response = client.get("/v1/me/usage", params=period, headers=bearer(user["key"]))
    assert response.status_code == 200, response.text
    usage = response.json()
    assert (usage["start"], usage["end"]) == ("2025-03-30", "2025-04-01")
    assert usage["total"] == totals(4, 16, 20, cached=11)
    assert usage["by_model"] == [
        {"model": "tiny-evals", **totals(1, 3, 4)},
        {"model": "tiny-llama", **totals(3, 13, 16, cached=11)},
    ]
    assert usage["by_day"] == [
        {"date": "2025-03-30", **totals(3, 9, 12, cached=11)},
        {"date": "2025-04-01", **totals(1, 7, 8)},
    ]
    # None of it is this month's: the quota is untouched.
    assert usage["quota"]["used_this_month"] == 0 and usage["quota"]["remaining"] == 1000
    assert usage["limits"] == {
        "rate_limit_per_minute": 0,
        "max_concurrent_jobs": 0,
        "monthly_token_quota": 1000,
        "monthly_spend_limit": "0",
    }


def test_my_usage_defaults_to_this_month(client, user, database_url, today):
    first = today.replace(day=1)
    record_usage(database_url, user["id"], 100, 100, at=at(first - timedelta(days=1)))
    record_usage(database_url, user["id"], 1, 1, at=at(first, 0, 0))
    usage = client.get("/v1/me/usage", headers=bearer(user["key"])).json()
    assert usage["total"] == totals(1, 1, 1)
    assert usage["quota"]["used_this_month"] == 2
    just_the_end = client.get(
        "/v1/me/usage", params={"end": (first - timedelta(days=1)).isoformat()},
        headers=bearer(user["key"]),
    ).json()  # fmt: skip
    assert just_the_end["start"] == (first - timedelta(days=1)).replace(day=1).isoformat()
    assert just_the_end["total"] == totals(1, 100, 100)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start": "2025-02-02", "end": "2025-02-01"}, "start 2025-02-02 is after end 2025-02-01"),
        ({"start": "2024-01-01", "end": "2025-01-01"}, "the period is 367 days; ask for at most"),
        ({"start": "yesterday"}, "'start'"),
    ],
)
def test_bad_periods_are_400(client, params, message):
    response = client.get("/v1/me/usage", params=params)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_admin_usage_by_key(client, database_url):
    big, small = create_key(client, "big user"), create_key(client, "small user")
    day = date(2024, 6, 15)
    record_usage(database_url, big["id"], 300, 200, at=at(day))
    record_usage(database_url, big["id"], 10, 10, cached=True, at=at(day))
    record_usage(database_url, small["id"], 2, 3, at=at(day))
    record_usage(database_url, None, 7, 7, at=at(day))  # made with auth off
    record_usage(database_url, small["id"], 1000, 1000, at=at(day + timedelta(days=1)))

    response = client.get("/v1/admin/usage", params={"start": "2024-06-15", "end": "2024-06-15"})
    assert response.status_code == 200, response.text
    usage = response.json()
    assert usage["total"] == totals(4, 319, 220, cached=20)
    assert usage["data"] == [
        {"owner": big["id"], "key_id": big["id"], "name": "big user", "prefix": big["prefix"],
         **totals(2, 310, 210, cached=20)},
        {"owner": None, "key_id": None, "name": None, "prefix": None, **totals(1, 7, 7)},
        {"owner": small["id"], "key_id": small["id"], "name": "small user",
         "prefix": small["prefix"], **totals(1, 2, 3)},
    ]  # fmt: skip
    # A user key sees only its own usage, never this.
    assert client.get("/v1/admin/usage", headers=bearer(small["key"])).status_code == 403
