"""GET /v1/stats on known rows written straight into the test database, checked against
percentiles computed here (continuous: linear interpolation, as Postgres's percentile_cont)."""

import math
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from db.session import session_scope
from db.tables import Job, JobResult

QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
SUCCEEDED = range(1, 11)  # job i: waits 10·i ms, ends 100·i ms after submission
COMPLETION_TOKENS = 11


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def expected(values: list[float]) -> dict[str, float]:
    return {name: pytest.approx(percentile(values, q), abs=1e-3) for name, q in QUANTILES.items()}


def add_job(session, model: str, created: datetime, status: str, **columns) -> Job:
    job = Job(
        id=uuid.uuid4(),
        kind="generate",
        model=model,
        queue=f"llmq.{model}.cpu",
        status=status,
        input={"prompt": "known"},
        params={"max_tokens": COMPLETION_TOKENS},
        attempts=1 if columns.get("started_at") else 0,
        created_at=created,
        **columns,
    )
    session.add(job)
    return job


@pytest.fixture(scope="module")
def known_model(database_url) -> str:
    """Ten succeeded jobs, three failed, one cancelled before it started and one still queued,
    all submitted ten minutes ago; and one job from two hours ago, outside an hour's window."""
    model = f"stats-{uuid.uuid4().hex[:8]}"
    submitted = datetime.now(UTC) - timedelta(minutes=10)
    ms = timedelta(milliseconds=1)
    with session_scope(database_url) as session:
        for i in SUCCEEDED:
            job = add_job(
                session,
                model,
                submitted,
                "succeeded",
                started_at=submitted + 10 * i * ms,
                finished_at=submitted + 100 * i * ms,
            )
            first_token_ms = 5.0 * i
            session.add(
                JobResult(
                    job_id=job.id,
                    text="x",
                    finish_reason="length",
                    prompt_tokens=i,
                    completion_tokens=COMPLETION_TOKENS,
                    time_to_first_token_ms=first_token_ms,
                    # i ms for each token after the first
                    duration_ms=first_token_ms + (COMPLETION_TOKENS - 1) * i,
                )
            )
        for category in ("timeout", "timeout", "model_error"):
            add_job(
                session,
                model,
                submitted,
                "failed",
                started_at=submitted + 1000 * ms,
                finished_at=submitted + 2000 * ms,
                error_category=category,
                error_message="known failure",
            )
        add_job(session, model, submitted, "cancelled", finished_at=submitted + 5 * ms)
        add_job(session, model, submitted, "queued")
        old = datetime.now(UTC) - timedelta(hours=2)
        add_job(session, model, old, "failed", started_at=old, finished_at=old, error_category="x")
    return model


def stats_of(client, model: str, **params) -> dict:
    response = client.get("/v1/stats", params={"model": model, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [entry["model"] for entry in body["data"]] == [model]
    return body["data"][0]


def test_stats_percentiles_match_known_latencies(client, known_model):
    stats = stats_of(client, known_model, window_s=3600)
    latency = stats["latency_ms"]

    assert latency["end_to_end"] == expected([100.0 * i for i in SUCCEEDED])
    # Failed jobs waited too: a second each.
    assert latency["queue_wait"] == expected([10.0 * i for i in SUCCEEDED] + [1000.0] * 3)
    assert latency["time_to_first_token"] == expected([5.0 * i for i in SUCCEEDED])
    assert latency["time_per_output_token"] == expected([float(i) for i in SUCCEEDED])


def test_stats_count_jobs_tokens_errors_and_throughput_in_the_window(client, known_model):
    stats = stats_of(client, known_model, window_s=3600)

    assert stats["jobs"] == {
        "submitted": 15,
        "queued": 1,
        "running": 0,
        "succeeded": 10,
        "failed": 3,
        "cancelled": 1,
    }
    assert stats["errors"] == {"timeout": 2, "model_error": 1}
    prompt = sum(SUCCEEDED)
    completion = COMPLETION_TOKENS * len(SUCCEEDED)
    assert stats["tokens"] == {
        "prompt": prompt,
        "completion": completion,
        "total": prompt + completion,
    }
    assert stats["throughput"]["jobs_per_s"] == pytest.approx(10 / 3600, abs=1e-6)
    assert stats["throughput"]["completion_tokens_per_s"] == pytest.approx(
        completion / 3600, abs=1e-6
    )


def test_stats_window_reaching_back_further_includes_older_jobs(client, known_model):
    stats = stats_of(client, known_model, window_s=3 * 3600)
    assert stats["jobs"]["submitted"] == 16
    assert stats["errors"] == {"timeout": 2, "model_error": 1, "x": 1}


def test_stats_window_with_no_jobs_gives_zeros_and_no_percentiles(client, known_model):
    stats = stats_of(client, known_model, window_s=60)
    assert stats["jobs"]["submitted"] == 0
    assert stats["latency_ms"]["end_to_end"] == {"p50": None, "p90": None, "p95": None, "p99": None}
    assert stats["tokens"]["total"] == 0 and stats["errors"] == {}


def test_stats_list_every_configured_model(client):
    response = client.get("/v1/stats")
    assert response.status_code == 200
    body = response.json()
    assert body["window_s"] == 3600
    assert {"tiny-llama", "tiny-offline"} <= {entry["model"] for entry in body["data"]}


def test_stats_window_out_of_range_is_400(client):
    response = client.get("/v1/stats", params={"window_s": 0})
    assert response.status_code == 400
    assert "window_s" in response.json()["error"]["message"]
