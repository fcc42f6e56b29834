"""The API's /metrics: HTTP traffic, submitted and cancelled jobs, and the queue figures read at
scrape time (queue depth from Redis, live workers from the worker poll).

The API runs in this process, so its counters also hold other tests' traffic: each test
compares a scrape before with one after."""

import json
import time

from tests.factories import read_samples, sample, submit

OFFLINE = {"model": "tiny-offline", "queue": "llmq.tiny-offline.cpu"}


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return read_samples(response.text)


def test_metrics_endpoint_serves_prometheus_text_without_auth(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for family in (
        "llmq_http_requests_total",
        "llmq_http_request_duration_seconds",
        "llmq_jobs_submitted_total",
        "llmq_jobs_finished_total",
        "llmq_jobs_failed_total",
        "llmq_cache_hits_total",
        "llmq_cache_misses_total",
        "llmq_queue_depth",
        "llmq_live_workers",
    ):
        assert f"# TYPE {family} " in response.text, family


def test_submitted_and_cancelled_jobs_counted_with_their_requests(client):
    before = scrape(client)
    jobs = [submit(client, model="tiny-offline", prompt=f"count me {i}") for i in range(3)]
    for job in jobs:
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("llmq_jobs_submitted_total", **OFFLINE) == 3
    assert moved("llmq_jobs_finished_total", model="tiny-offline", status="cancelled") == 3
    submits = {"method": "POST", "route": "/v1/jobs"}
    assert moved("llmq_http_requests_total", **submits, status="202") == 3
    assert moved("llmq_http_request_duration_seconds_count", **submits) == 3
    cancels = {"method": "POST", "route": "/v1/jobs/{job_id}/cancel"}
    assert moved("llmq_http_requests_total", **cancels, status="200") == 3


def test_unknown_paths_share_one_route_label(client):
    before = scrape(client)
    for path in ("/nope", "/wp-admin/setup.php", "/v2/jobs"):
        assert client.get(path).status_code == 404
    after = scrape(client)
    labels = {"method": "GET", "route": "unmatched", "status": "404"}
    assert (
        sample(after, "llmq_http_requests_total", **labels)
        - sample(before, "llmq_http_requests_total", **labels)
        == 3
    )
    routes = {dict(labels)["route"] for name, labels in after if name == "llmq_http_requests_total"}
    assert not {"/nope", "/wp-admin/setup.php", "/v2/jobs"} & routes


def test_queue_depth_counts_queued_jobs_while_no_worker_runs(client, app):
    app.state.live_queues.refresh()
    before = scrape(client)
    assert sample(before, "llmq_live_workers", **OFFLINE) == 0
    assert ("llmq_queue_depth", frozenset(OFFLINE.items())) in before

    jobs = [submit(client, model="tiny-offline", prompt=f"wait {i}") for i in range(4)]
    try:
        after = scrape(client)
        depth = sample(after, "llmq_queue_depth", **OFFLINE)
        assert depth == sample(before, "llmq_queue_depth", **OFFLINE) + 4
    finally:
        for job in jobs:
            client.post(f"/v1/jobs/{job['id']}/cancel")


def test_live_workers_counts_the_running_worker(live_client):
    samples = scrape(live_client)
    running = {"model": "tiny-llama", "queue": "llmq.tiny-llama.cpu"}
    assert sample(samples, "llmq_live_workers", **running) >= 1
    assert sample(samples, "llmq_live_workers", **OFFLINE) == 0


def test_batch_lines_show_in_queue_depth_and_batch_figures(client):
    before = scrape(client)
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"m{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny-offline", "messages": [{"role": "user", "content": "hi"}]},
            }
        )
        + "\n"
        for i in range(3)
    )
    upload = client.post(
        "/v1/files", files={"file": ("m.jsonl", lines.encode())}, data={"purpose": "batch"}
    ).json()
    batch = client.post(
        "/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions"},
    ).json()
    try:
        deadline = time.monotonic() + 30
        while (
            sample(scrape(client), "llmq_batch_jobs_open", model="tiny-offline", status="queued")
            < 3
        ):
            assert time.monotonic() < deadline, "the batch's lines were never queued"
            time.sleep(0.1)
        after = scrape(client)
        # Batch lines wait on the queue's lower-priority list: the depth counts them too.
        assert (
            sample(after, "llmq_queue_depth", **OFFLINE)
            >= sample(before, "llmq_queue_depth", **OFFLINE) + 3
        )
        assert sample(after, "llmq_batches", status="in_progress") >= 1
    finally:
        client.post(f"/v1/batches/{batch['id']}/cancel")
