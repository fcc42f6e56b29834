"""Request tracing end to end: an API server and real workers, both exporting OTLP/HTTP to a
receiver in this process. One job is one trace from the API's request span through the
worker's claim, engine and result spans, a re-send by the reconciler continues it, and a
streamed OpenAI request's trace includes the relay.

The workers serve `tiny-observed` (whose other test module runs its own worker before or after
this one) and `tiny-faults` (started here only once its job's message has been lost)."""

import json
import os
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from redis import Redis

from api.background.reconciler import waiting_job_ids
from api.fleet.queues import priority_lists
from bench.otlp import OtlpReceiver
from db.session import session_scope
from db.tables import Job
from llmq.tracing import requested
from tests.factories import (
    AUTH,
    start_api,
    start_worker,
    stop_worker,
    wait_for_job,
    wait_for_queue,
)

MODEL = "tiny-observed"
RESENT_MODEL = "tiny-faults"
WORKER_SPANS = (
    "llmq.claim",
    "llmq.engine.admission",
    "llmq.engine.prefill",
    "llmq.engine.decode",
    "llmq.result.write",
    "llmq.stream.publish",
)


class Receiver:
    """An OTLP/HTTP trace receiver: every exported span, by trace id."""

    def __init__(self) -> None:
        self.spans: dict[str, list[dict]] = defaultdict(list)
        self.lock = threading.Lock()
        self.otlp = OtlpReceiver(self.add)
        self.port = self.otlp.port

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    entry = {
                        "name": span.name,
                        "service": service,
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex() or None,
                        "start": span.start_time_unix_nano / 1e9,
                        "end": span.end_time_unix_nano / 1e9,
                        "attributes": attributes,
                        "links": [link.trace_id.hex() for link in span.links],
                    }
                    with self.lock:
                        self.spans[span.trace_id.hex()].append(entry)

    def trace(self, trace_id: str, until, timeout: float = 30) -> dict[str, list[dict]]:
        """The trace's spans by name, once `until(spans by name)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                by_name: dict[str, list[dict]] = defaultdict(list)
                for span in self.spans.get(trace_id, []):
                    by_name[span["name"]].append(span)
            if until(by_name):
                return by_name
            assert time.monotonic() < deadline, f"trace incomplete: {sorted(by_name)}"
            time.sleep(0.1)


def _value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def traced_env(receiver: Receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_TRACES_SAMPLER_ARG": "1.0",  # the default sampler's ratio: every request
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "LLMQ_LOG_JSON": "true",
    }


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    receiver = Receiver()
    yield receiver
    receiver.otlp.close()


@pytest.fixture(scope="module")
def traced(receiver, database_url, redis_url, tiny_model_path):
    """(API base URL, worker log path) of a traced API server and a traced worker."""
    env = traced_env(receiver)
    api, base_url = start_api(
        log_name="api-traced",
        LLMQ_REQUEUE_AFTER_S="1",
        LLMQ_RECONCILE_INTERVAL_S="0.3",
        **env,
    )
    worker = start_worker(MODEL, log_name="worker-traced", **env)
    try:
        wait_for_queue(f"llmq.{MODEL}.cpu", worker)
        yield base_url
    finally:
        stop_worker(worker)
        stop_worker(api)


def trace_id_of(response: httpx.Response) -> str:
    traceparent = response.headers["traceparent"]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, flags) == ("00", "01")
    return trace_id


def job_complete(spans: dict) -> bool:
    return all(name in spans for name in ("llmq.job", "llmq.queue_wait", *WORKER_SPANS))


def only(spans: dict, name: str) -> dict:
    assert len(spans[name]) == 1, f"{len(spans[name])} {name} spans"
    return spans[name][0]


def job_times(database_url: str, job_id: str) -> tuple[float, float]:
    with session_scope(database_url) as session:
        job = session.get(Job, uuid.UUID(job_id))
        return job.created_at.timestamp(), job.finished_at.timestamp()


def assert_worker_spans(spans: dict, parent: dict, max_tokens: int) -> dict:
    """The worker's spans hang under `parent` (the API's submit span) and add up."""
    wait, run = only(spans, "llmq.queue_wait"), only(spans, "llmq.job")
    assert wait["parent"] == run["parent"] == parent["span_id"]
    assert wait["service"] == run["service"] == "llmq-worker"
    assert abs(wait["end"] - run["start"]) < 0.001  # the wait ends as the claim begins
    for name in WORKER_SPANS:
        span = only(spans, name)
        assert span["parent"] == run["span_id"], name
        assert run["start"] - 0.001 <= span["start"] <= span["end"] <= run["end"] + 0.001, name
    admission, prefill, decode = (
        only(spans, f"llmq.engine.{stage}") for stage in ("admission", "prefill", "decode")
    )
    assert admission["end"] == pytest.approx(prefill["start"], abs=0.001)
    assert prefill["end"] == pytest.approx(decode["start"], abs=0.001)
    assert decode["attributes"]["llmq.decode.steps"] == max_tokens
    assert decode["attributes"]["llmq.decode.mean_batch_size"] >= 1
    return {"wait": wait, "run": run}


def test_tracing_is_off_unless_an_exporter_is_configured():
    assert not requested({})
    assert requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not requested(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    )


def test_one_job_is_one_trace_across_api_and_worker(traced, receiver, database_url):
    body = {"model": MODEL, "prompt": "trace me", "max_tokens": 4, "ignore_eos": True}
    response = httpx.post(f"{traced}/v1/jobs", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    trace_id = trace_id_of(response)
    job = wait_for_job(httpx.Client(base_url=traced, headers=AUTH), response.json()["id"])
    assert job["status"] == "succeeded"

    spans = receiver.trace(
        trace_id, lambda s: job_complete(s) and "run/llmq.generate" in s and "POST /v1/jobs" in s
    )
    server = only(spans, "POST /v1/jobs")
    assert server["parent"] is None and server["service"] == "llmq-api"
    submit = only(spans, "llmq.submit")
    assert submit["parent"] == server["span_id"]
    assert submit["attributes"]["llmq.job_ids"] == [job["id"]]
    # The row's INSERT is the submit span's child (the SQLAlchemy instrumentation).
    inserts = [s for name, group in spans.items() if name.startswith("INSERT") for s in group]
    assert any(s["parent"] == submit["span_id"] for s in inserts), sorted(spans)
    # The message carried the context too: the Celery spans are in this trace.
    publish = only(spans, "apply_async/llmq.generate")
    assert publish["parent"] == submit["span_id"]
    assert only(spans, "run/llmq.generate")["parent"] == publish["span_id"]
    parts = assert_worker_spans(spans, submit, max_tokens=4)

    # Queue wait plus run is the job's whole life, as Postgres recorded it.
    created, finished = job_times(database_url, job["id"])
    wait, run = parts["wait"], parts["run"]
    assert wait["start"] == pytest.approx(created, abs=0.002)
    total = (wait["end"] - wait["start"]) + (run["end"] - run["start"])
    assert total == pytest.approx(run["end"] - created, abs=0.005)
    assert finished <= run["end"] + 0.05 and run["end"] - finished < 5  # announced after

    # Both processes' log lines about the job carry its trace id.
    logs = Path(os.environ["LLMQ_DATA_DIR"])
    worker_lines = [
        json.loads(line)
        for line in (logs / "worker-traced.log").read_text().splitlines()
        if line.startswith("{") and job["id"] in line
    ]
    assert any(line.get("trace_id") == trace_id for line in worker_lines), worker_lines
    api_lines = [
        json.loads(line)
        for line in (logs / "api-traced.log").read_text().splitlines()
        if line.startswith("{") and trace_id in line
    ]
    assert any(line.get("event") == "request served" for line in api_lines)


def test_a_job_sent_again_by_the_reconciler_continues_its_trace(
    traced, receiver, database_url, redis_url
):
    redis = Redis.from_url(redis_url)
    queue = f"llmq.{RESENT_MODEL}.cpu"
    body = {"model": RESENT_MODEL, "prompt": "lost and found", "max_tokens": 2, "ignore_eos": True}
    response = httpx.post(f"{traced}/v1/jobs", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    trace_id, job_id = trace_id_of(response), response.json()["id"]
    deadline = time.monotonic() + 10
    while job_id not in waiting_job_ids(redis, {queue}):
        assert time.monotonic() < deadline, "the job was never sent"
        time.sleep(0.05)
    redis.delete(*priority_lists(queue))  # the message is lost
    deadline = time.monotonic() + 30
    while job_id not in waiting_job_ids(redis, {queue}):
        assert time.monotonic() < deadline, "the reconciler did not send the job again"
        time.sleep(0.1)

    worker = start_worker(RESENT_MODEL, log_name="worker-traced-resent", **traced_env(receiver))
    try:
        wait_for_queue(queue, worker)
        job = wait_for_job(httpx.Client(base_url=traced, headers=AUTH), job_id)
        assert job["status"] == "succeeded"
        spans = receiver.trace(
            trace_id,
            lambda s: job_complete(s) and len(s["apply_async/llmq.generate"]) == 2,
        )
    finally:
        stop_worker(worker)
    submit = only(spans, "llmq.submit")
    first, again = sorted(spans["apply_async/llmq.generate"], key=lambda s: s["start"])
    # Both sends belong to the request's trace, the second one the reconciler's.
    assert first["parent"] == again["parent"] == submit["span_id"]
    assert first["service"] == again["service"] == "llmq-api"
    assert only(spans, "run/llmq.generate")["parent"] == again["span_id"]
    parts = assert_worker_spans(spans, submit, max_tokens=2)
    assert parts["wait"]["start"] < again["start"] < parts["wait"]["end"]


def test_a_streamed_openai_request_traces_its_relay(traced, receiver):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream with a trace"}],
        "max_tokens": 5,
        "ignore_eos": True,  # a first token that ends the text would leave no token event
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{traced}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        trace_id = trace_id_of(response)
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"

    spans = receiver.trace(trace_id, lambda s: job_complete(s) and "llmq.stream.relay" in s)
    server = only(spans, "POST /v1/chat/completions")
    relay = only(spans, "llmq.stream.relay")
    assert relay["parent"] == server["span_id"] and relay["service"] == "llmq-api"
    assert relay["attributes"]["llmq.completed"] is True
    assert relay["attributes"]["llmq.events"] >= 2  # at least a token and the end
    submit = only(spans, "llmq.submit")
    assert submit["parent"] == server["span_id"]
    run = only(spans, "llmq.job")
    # The relay spans the worker's run: it began before the job ran and ended after it.
    assert (
        relay["start"] < run["start"]
        and relay["end"] >= only(spans, "llmq.stream.publish")["start"]
    )
    assert server["end"] >= relay["end"]
