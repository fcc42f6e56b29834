"""A remote model's jobs are traced like local ones, and the requests its worker sends the
upstream for a job are spans of the job's trace, children of its `llmq.job` span (their
traceparent header lets an upstream that traces continue the trace)."""

import time
import uuid

import httpx
import pytest

from tests.evals.conftest import EVAL_DATA_ROOT, write_benchmarks
from tests.factories import AUTH, start_api, start_worker, stop_worker, wait_for_job, wait_for_queue
from tests.traces import (
    Receiver,
    finished_mmlu_run,
    only,
    own_database,
    trace_id_of,
    traced_env,
)

MODEL = "tiny-remote-traced"
QUEUE = "llmq.tiny-remote-traced.remote"


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    receiver = Receiver()
    yield receiver
    receiver.otlp.close()


@pytest.fixture(scope="module")
def traced_front(receiver, upstream, database_url, redis_url):
    """A traced API and a traced worker of a remote model, in front of the upstream, on a
    database of their own."""
    with own_database(database_url, "remote_traced") as url:
        env = traced_env(receiver) | {"LLMQ_DATABASE_URL": url}
        api, base_url = start_api(log_name="api-remote-traced", **env)
        worker = start_worker(MODEL, log_name="worker-remote-traced", **env)
        try:
            wait_for_queue(QUEUE, worker)
            yield httpx.Client(base_url=base_url, headers=AUTH, timeout=60)
        finally:
            stop_worker(worker)
            stop_worker(api)


def upstream_requests(spans: dict) -> list[dict]:
    """The worker's HTTP client spans (the httpx instrumentation's), by their method name."""
    return [s for s in spans.get("POST", []) if s["service"] == "llmq-worker"]


def test_a_remote_jobs_upstream_request_is_a_child_of_its_job_span(traced_front, receiver):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
    submitted = traced_front.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    trace_id = trace_id_of(submitted)
    job = wait_for_job(traced_front, submitted.json()["id"])
    assert job["status"] == "succeeded", job

    # The API's spans and the worker's come from two processes, each in its own time.
    expected = ("llmq.submit", "llmq.queue_wait", "llmq.job", "llmq.result.write")
    spans = receiver.trace(
        trace_id, lambda s: all(name in s for name in expected) and upstream_requests(s)
    )
    run = only(spans, "llmq.job")
    assert run["attributes"]["llmq.job_id"] == job["id"]
    assert only(spans, "llmq.queue_wait")["parent"] == only(spans, "llmq.submit")["span_id"]
    (sent,) = upstream_requests(spans)
    assert sent["parent"] == run["span_id"]
    assert run["start"] <= sent["start"] <= sent["end"] <= run["end"]
    assert "llmq.engine.decode" not in spans  # the upstream's engine is not this worker's


def test_a_remote_scoring_jobs_upstream_request_is_in_its_trace(traced_front, receiver):
    write_benchmarks(EVAL_DATA_ROOT)
    run_id, _ = finished_mmlu_run(traced_front, MODEL)

    run_trace = uuid.UUID(run_id).hex
    deadline = time.monotonic() + 30
    while True:
        linked = receiver.linked_to(run_trace)
        if len(linked) == 2 and all(
            "llmq.engine.score" in s and upstream_requests(s) for s in linked.values()
        ):
            break
        assert time.monotonic() < deadline, linked
        time.sleep(0.1)
    for spans in linked.values():
        run_span, score = only(spans, "llmq.job"), only(spans, "llmq.engine.score")
        assert score["parent"] == run_span["span_id"]
        for sent in upstream_requests(spans):  # one echo request per job
            assert sent["parent"] == run_span["span_id"]
            assert score["start"] <= sent["start"] <= sent["end"] <= score["end"] + 0.001
