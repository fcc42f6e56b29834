"""A worker's own /metrics and its JSON log lines, from a real `llmq worker` subprocess for
`tiny-observed`, a model no other test sends jobs to, so the counts are exactly this module's."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.factories import (
    ROOT,
    free_port,
    read_samples,
    sample,
    stop_worker,
    submit,
    wait_for_job,
    wait_for_queue,
)

MODEL = "tiny-observed"
LABELS = {"model": MODEL, "queue": f"llmq.{MODEL}.cpu"}


@pytest.fixture(scope="module")
def observed_worker(database_url, redis_url, tiny_model_path):
    """(metrics URL, log file) of a worker that logs JSON and serves metrics on its own port."""
    port = free_port()
    log_path = Path(os.environ["LLMQ_DATA_DIR"]) / f"worker-{MODEL}.jsonl"
    command = [sys.executable, "-m", "llmq.cli", "worker", "--model", MODEL, "--device", "cpu"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--metrics-port", str(port)],
            cwd=ROOT,
            env=os.environ | {"LLMQ_LOG_JSON": "true"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_queue(LABELS["queue"], process)
        yield f"http://127.0.0.1:{port}/metrics", log_path
    finally:
        stop_worker(process)


def scrape(url: str) -> dict:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return read_samples(response.text)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def test_worker_metrics_after_known_jobs(client, observed_worker):
    url, _ = observed_worker
    before = scrape(url)
    jobs = [
        submit(client, model=MODEL, prompt=f"count {i}", max_tokens=5, ignore_eos=True)
        for i in range(3)
    ]
    done = [wait_for_job(client, job["id"]) for job in jobs]
    assert [job["status"] for job in done] == ["succeeded"] * 3
    after = scrape(url)

    assert moved(before, after, "llmq_jobs_finished_total", model=MODEL, status="succeeded") == 3
    assert moved(before, after, "llmq_completion_tokens_total", **LABELS) == 15
    prompt_tokens = sum(job["result"]["usage"]["prompt_tokens"] for job in done)
    assert moved(before, after, "llmq_prompt_tokens_total", **LABELS) == prompt_tokens
    for histogram in (
        "llmq_job_queue_wait_seconds",
        "llmq_job_time_to_first_token_seconds",
        "llmq_job_time_per_output_token_seconds",
        "llmq_job_duration_seconds",
    ):
        assert moved(before, after, f"{histogram}_count", **LABELS) == 3, histogram
    # Each job sits in exactly five decode steps (a token each), however they were batched, so
    # the batch sizes of all steps add up to the tokens.
    steps = moved(before, after, "llmq_decode_steps_total", **LABELS)
    assert 5 <= steps <= 15
    assert moved(before, after, "llmq_batch_size_count", **LABELS) == steps
    assert moved(before, after, "llmq_batch_size_sum", **LABELS) == 15
    assert sample(after, "llmq_active_sequences", **LABELS) == 0


def test_worker_metrics_count_a_failure_by_category(client, observed_worker):
    url, _ = observed_worker
    before = scrape(url)
    # A deadline that has passed by the first decode step: the job fails with a timeout.
    job = submit(client, model=MODEL, prompt="too slow", max_tokens=50, timeout_s=0.001)
    failed = wait_for_job(client, job["id"])
    assert failed["status"] == "failed" and failed["error"]["category"] == "timeout"
    after = scrape(url)

    assert moved(before, after, "llmq_jobs_finished_total", model=MODEL, status="failed") == 1
    assert moved(before, after, "llmq_jobs_failed_total", model=MODEL, category="timeout") == 1
    assert moved(before, after, "llmq_jobs_finished_total", model=MODEL, status="succeeded") == 0
    assert moved(before, after, "llmq_job_queue_wait_seconds_count", **LABELS) == 1
    assert moved(before, after, "llmq_job_duration_seconds_count", **LABELS) == 0


def test_worker_metrics_describe_the_model(observed_worker):
    samples = scrape(observed_worker[0])
    info = {**LABELS, "device": "cpu", "dtype": "float32", "revision": "local"}
    assert sample(samples, "llmq_model_info", **info) == 1
    assert sample(samples, "llmq_model_load_seconds", model=MODEL, device="cpu") > 0


def test_job_log_lines_carry_request_job_model_and_queue(client, observed_worker):
    _, log_path = observed_worker
    request_id = f"logs-{uuid.uuid4().hex[:12]}"
    response = client.post(
        "/v1/jobs",
        json={"model": MODEL, "prompt": "log me", "max_tokens": 3},
        headers={"X-Request-ID": request_id},
    )
    job_id = response.json()["id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"

    deadline = time.monotonic() + 10  # the line follows the stored result
    while True:
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
        mine = [line for line in lines if line.get("job_id") == job_id]
        if any(line["event"] == "job succeeded" for line in mine):
            break
        assert time.monotonic() < deadline, f"no 'job succeeded' line for {job_id}: {mine}"
        time.sleep(0.1)
    for line in mine:
        assert line["request_id"] == request_id, line
        assert line["model"] == MODEL and line["queue"] == LABELS["queue"], line
        assert line["level"] and line["timestamp"], line
