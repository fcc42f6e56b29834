"""Request tracing end to end: an API server and real workers, both exporting OTLP/HTTP to a
receiver in this process. One job is one trace from the API's request span through the
worker's claim, engine and result spans, a re-send by the reconciler continues it, and a
streamed OpenAI request's trace includes the relay.

An evaluation run and a Batch file are one trace each, their jobs' traces linked to it; scoring
jobs (evaluation items) have worker spans like generation jobs; a client reading a job's event
stream gets a relay span linked to the job's trace.

The workers serve `tiny-observed` (whose other test module runs its own worker before or after
this one) and `tiny-faults` (started here only once its job's message has been lost)."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from redis import Redis

from api.background.reconciler import waiting_job_ids
from api.fleet.queues import priority_lists
from db.session import session_scope
from db.tables import Job
from llmq.tracing import _disabled, requested
from tests.evals.conftest import EVAL_DATA_ROOT, write_benchmarks
from tests.factories import (
    ADMIN_KEY,
    AUTH,
    start_api,
    start_worker,
    stop_worker,
    wait_for_job,
    wait_for_queue,
)
from tests.traces import (
    Receiver,
    finished_mmlu_run,
    only,
    own_database,
    trace_id_of,
    traced_env,
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


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    receiver = Receiver()
    yield receiver
    receiver.otlp.close()


@pytest.fixture(scope="module")
def traced_database(database_url):
    with own_database(database_url, "traced") as url:
        yield url


@pytest.fixture(scope="module")
def traced(receiver, traced_database, redis_url, tiny_model_path):
    """The base URL of a traced API server, beside a traced worker, on a database of their own."""
    env = traced_env(receiver) | {"LLMQ_DATABASE_URL": traced_database}
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


def run_traced_check(script: str, receiver: Receiver, **env: str) -> None:
    """Run a check script in a traced process of its own (tracing is set up once per process);
    it prints "ok" last when every assertion held."""
    env = os.environ | traced_env(receiver) | env
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "ok", done.stderr


def job_complete(spans: dict) -> bool:
    return all(name in spans for name in ("llmq.job", "llmq.queue_wait", *WORKER_SPANS))


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


def test_an_operator_can_turn_instrumentations_off(monkeypatch):
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", " redis, sqlalchemy ,")
    assert _disabled() == {"redis", "sqlalchemy"}
    monkeypatch.delenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
    assert _disabled() == set()


def test_one_job_is_one_trace_across_api_and_worker(traced, receiver, traced_database):
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
    # The row's INSERT and COMMIT, shared with the requests beside it (one span in each of
    # their traces), are the submit span's child.
    store = only(spans, "llmq.store")
    assert store["parent"] == submit["span_id"]
    assert store["attributes"]["llmq.group_jobs"] >= 1
    assert submit["start"] <= store["start"] <= store["end"] <= submit["end"]
    # The message carried the context too: the Celery spans are in this trace.
    publish = only(spans, "apply_async/llmq.generate")
    assert publish["parent"] == submit["span_id"]
    assert only(spans, "run/llmq.generate")["parent"] == publish["span_id"]
    parts = assert_worker_spans(spans, submit, max_tokens=4)

    # Queue wait plus run is the job's whole life, as Postgres recorded it.
    created, finished = job_times(traced_database, job["id"])
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
    # The job's own line too, though a thread that stores several requests' jobs wrote it.
    assert any(line.get("event") == "job queued" for line in api_lines), api_lines


def test_a_job_with_an_idempotency_key_traces_its_own_insert(traced, receiver):
    body = {"model": MODEL, "prompt": "trace my insert", "max_tokens": 1}
    headers = AUTH | {"Idempotency-Key": f"trace-{uuid.uuid4()}"}
    response = httpx.post(f"{traced}/v1/jobs", json=body, headers=headers, timeout=30)
    assert response.status_code == 202, response.text

    # Its transaction is its own: the SQLAlchemy instrumentation's INSERT span is in its trace.
    spans = receiver.trace(
        trace_id_of(response),
        lambda s: "llmq.submit" in s and any(name.startswith("INSERT") for name in s),
    )
    submit = only(spans, "llmq.submit")
    inserts = [s for name, group in spans.items() if name.startswith("INSERT") for s in group]
    assert any(s["parent"] == submit["span_id"] for s in inserts), sorted(spans)


def test_a_job_sent_again_by_the_reconciler_continues_its_trace(
    traced, receiver, traced_database, redis_url
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

    env = traced_env(receiver) | {"LLMQ_DATABASE_URL": traced_database}
    worker = start_worker(RESENT_MODEL, log_name="worker-traced-resent", **env)
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

    # Each process exports its spans in the order they ended: the request's span ends last.
    server_name = "POST /v1/chat/completions"
    spans = receiver.trace(trace_id, lambda s: job_complete(s) and server_name in s)
    server = only(spans, server_name)
    relay = only(spans, "llmq.stream.relay")
    assert relay["parent"] == server["span_id"] and relay["service"] == "llmq-api"
    assert relay["attributes"]["llmq.completed"] is True
    assert relay["attributes"]["llmq.events"] >= 2  # at least a token and the end
    submit = only(spans, "llmq.submit")
    assert submit["parent"] == server["span_id"]
    assert only(spans, "llmq.store")["parent"] == submit["span_id"]
    # The relay begins once the job is queued (the worker may already be running it: the
    # stream's replay buffer keeps what came before) and ends after the publish began.
    assert relay["start"] >= submit["end"]
    assert relay["end"] >= only(spans, "llmq.stream.publish")["start"]
    assert server["end"] >= relay["end"]


def test_reading_a_jobs_events_traces_the_relay_linked_to_the_job(traced, receiver):
    client = httpx.Client(base_url=traced, headers=AUTH, timeout=30)
    body = {"model": MODEL, "prompt": "read my events", "max_tokens": 3, "ignore_eos": True}
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job_trace, job_id = trace_id_of(submitted), submitted.json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        reader_trace = trace_id_of(response)
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: done"
    assert reader_trace != job_trace  # the reader's request is a trace of its own...

    server_name = "GET /v1/jobs/{job_id}/events"  # it ends after the relay: exported after it
    spans = receiver.trace(reader_trace, lambda s: server_name in s)
    server = only(spans, server_name)
    relay = only(spans, "llmq.stream.relay")
    assert relay["parent"] == server["span_id"] and relay["service"] == "llmq-api"
    assert relay["links"] == [job_trace]  # ...linked to the job's
    assert relay["attributes"]["llmq.completed"] is True
    assert relay["attributes"]["llmq.events"] == len(events)
    receiver.trace(job_trace, job_complete)


def traces_linked(receiver: Receiver, trace_id: str, count: int, until) -> dict[str, dict]:
    """The `count` traces linked to `trace_id`, once `until(spans by name)` holds for each."""
    deadline = time.monotonic() + 30
    while True:
        linked = receiver.linked_to(trace_id)
        if len(linked) == count and all(map(until, linked.values())):
            return linked
        assert time.monotonic() < deadline, f"{len(linked)} linked traces: {linked}"
        time.sleep(0.1)


def test_an_evaluation_run_is_one_trace_its_items_linked_with_scoring_spans(traced, receiver):
    write_benchmarks(EVAL_DATA_ROOT)
    client = httpx.Client(base_url=traced, headers=AUTH, timeout=30)
    run_id, items = finished_mmlu_run(client, MODEL)
    assert len(items) == 2

    run_trace = uuid.UUID(run_id).hex  # the run's trace id is its own id
    feeds = receiver.trace(run_trace, lambda s: "llmq.eval.feed" in s)["llmq.eval.feed"]
    for feed in feeds:  # a span for each sweep that queued items
        assert feed["attributes"]["llmq.run_id"] == run_id and feed["parent"] is None

    scored = ("llmq.claim", "llmq.engine.score", "llmq.result.write")
    linked = traces_linked(
        receiver, run_trace, 2, lambda s: all(n in s for n in ("llmq.job", *scored))
    )
    jobs = set()
    for spans in linked.values():
        item = only(spans, "llmq.eval.item")
        assert item["parent"] is None and item["links"] == [run_trace]
        wait, run_span = only(spans, "llmq.queue_wait"), only(spans, "llmq.job")
        assert wait["parent"] == run_span["parent"] == item["span_id"]
        assert run_span["service"] == "llmq-worker"
        for name in scored:
            span = only(spans, name)
            assert span["parent"] == run_span["span_id"], name
            assert run_span["start"] - 0.001 <= span["start"] <= span["end"] <= run_span["end"]
        assert only(spans, "llmq.engine.score")["attributes"]["llmq.pairs"] == 4  # 4 choices
        jobs.add(run_span["attributes"]["llmq.job_id"])
    assert jobs == {item["job_id"] for item in items}


def test_a_batch_is_one_trace_its_lines_linked(traced, receiver, traced_database):
    oai = openai.OpenAI(base_url=f"{traced}/v1", api_key=ADMIN_KEY)
    lines = [
        {
            "custom_id": f"t{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"line {i}"}],
                "max_tokens": 2,
                "ignore_eos": True,
            },
        }
        for i in range(2)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = oai.files.create(file=("traced.jsonl", content), purpose="batch")
    batch = oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while (batch := oai.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    with session_scope(traced_database) as session:
        job_ids = {str(j.id) for j in session.query(Job).filter(Job.batch_id == batch.id)}
    assert len(job_ids) == 2

    batch_trace = uuid.uuid5(uuid.NAMESPACE_URL, f"llmq:{batch.id}").hex
    queued = receiver.trace(batch_trace, lambda s: "llmq.batch.queue" in s)
    assert all(s["attributes"]["llmq.batch_id"] == batch.id for s in queued["llmq.batch.queue"])
    linked = traces_linked(receiver, batch_trace, 2, job_complete)
    jobs = set()
    for spans in linked.values():
        line = only(spans, "llmq.batch.line")
        assert line["parent"] is None and line["links"] == [batch_trace]
        assert_worker_spans(spans, line, max_tokens=2)  # the line's jobs are its children
        jobs.add(only(spans, "llmq.job")["attributes"]["llmq.job_id"])
    assert jobs == job_ids


QUIET_CHECK = """
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from llmq import tracing
assert tracing.configure_tracing("llmq-test", ())
with tracing.quiet_unless_traced():
    assert not is_instrumentation_enabled(), "unsampled work left the instrumentations on"
with tracing.tracer().start_as_current_span("sampled") as span:
    assert span.is_recording()
    with tracing.quiet_unless_traced():
        assert is_instrumentation_enabled(), "a recorded trace lost its library spans"
with tracing.attached(None):
    assert not is_instrumentation_enabled(), "an untraced job's send was instrumented"
print("ok")
"""


def test_work_outside_a_recorded_trace_runs_the_instrumentations_quiet(receiver):
    """The library instrumentations build a span's name and attributes before the sampler
    decides; outside a recorded trace they are switched off instead."""
    run_traced_check(QUIET_CHECK, receiver, OTEL_TRACES_SAMPLER="parentbased_always_on")


HEAD_SAMPLING_CHECK = """
import contextvars
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from llmq import tracing
assert tracing.configure_tracing("llmq-test", ())

def arrives(headers=()):
    context = contextvars.copy_context()  # each request runs in a context of its own
    def request():
        traced = tracing._head_sampled({"type": "http", "headers": list(headers)})
        span = tracing.tracer().start_span("POST /v1/jobs", kind=SpanKind.SERVER)
        return traced, span, tracing.request_traced()
    return context.run(request)

kept = 0
for _ in range(600):
    traced, span, own_spans = arrives()
    assert own_spans == traced
    if traced:  # the server span takes the trace id the decision was made on, and so is kept
        kept += 1
        assert span.is_recording(), "a request sampled as it arrived lost its server span"
        again = tracing.tracer().start_span("another root", kind=SpanKind.SERVER)
        assert again.get_span_context().trace_id != span.get_span_context().trace_id
assert 220 < kept < 380, kept  # a ratio of one half, decided once per request

parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-"
traced, span, own_spans = arrives([(b"traceparent", (parent + "01").encode())])
assert traced and own_spans
traced, span, own_spans = arrives([(b"traceparent", (parent + "00").encode())])
assert not traced and not own_spans  # the caller's decision stands
print("ok")
"""


def test_a_request_is_sampled_as_it_arrives_and_its_server_span_keeps_the_verdict(receiver):
    """A dropped request pays for none of FastAPI's telemetry: the sampler decides before it,
    on the trace id the server span then takes, so that a ratio holds for whole requests."""
    run_traced_check(
        HEAD_SAMPLING_CHECK,
        receiver,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.5",
    )


LATER_SPAN_CHECK = """
import contextvars
from opentelemetry.trace import SpanKind
from llmq import tracing
assert tracing.configure_tracing("llmq-test", ())
ended = []

class Collect:
    def on_end(self, span):
        ended.append(span)

tracing._processors.append(Collect())

def request(work, headers=()):
    def arrives():
        tracing._head_sampled({"type": "http", "headers": list(headers)})
        return work()
    return contextvars.copy_context().run(arrives)

def under_the_server_span():
    with tracing.tracer().start_as_current_span("POST /v1/jobs", kind=SpanKind.SERVER) as server:
        with tracing.later_span("llmq.submit") as submit:
            submit.attributes["llmq.jobs"] = 1
            assert not any(s.name == "llmq.submit" for s in ended)  # recorded when it ends
        return server.get_span_context(), submit

server, submit = request(under_the_server_span)
[span] = [s for s in ended if s.name == "llmq.submit"]
assert span.parent.span_id == server.span_id and span.context.trace_id == server.trace_id
assert span.attributes["llmq.jobs"] == 1 and span.end_time >= span.start_time
assert submit.traceparent == f"00-{server.trace_id:032x}-{span.context.span_id:016x}-01"

def without_a_server_span():  # FastAPI's telemetry turned off
    drawn = tracing._head_trace_id.get()
    with tracing.later_span("llmq.submit"):
        pass
    return drawn

ended.clear()
drawn = request(without_a_server_span)
[span] = ended
assert span.parent is None and span.context.trace_id == drawn  # the request's own trace

def refused():
    try:
        with tracing.later_span("llmq.submit"):
            raise ValueError("over the limit")
    except ValueError:
        pass

ended.clear()
request(refused)
[span] = ended
assert span.status.status_code.name == "ERROR" and "over the limit" in span.status.description

def dropped():
    with tracing.later_span("llmq.submit") as submit:
        return submit

ended.clear()
unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
assert request(dropped, [(b"traceparent", unsampled.encode())]) is None and ended == []
print("ok")
"""


def test_a_span_recorded_when_its_work_ends_keeps_its_place_in_the_trace(receiver):
    """`llmq.submit` of a request stored with others is recorded after the fact: under the
    request's span, or a trace's root where FastAPI's telemetry is off, with the block's
    attributes or its error, and not at all for a request dropped as it arrived."""
    run_traced_check(LATER_SPAN_CHECK, receiver, OTEL_TRACES_SAMPLER="parentbased_always_on")


def test_a_dropped_request_makes_no_spans_and_a_callers_sampled_trace_is_continued(
    receiver, traced_database
):
    env = traced_env(receiver) | {"LLMQ_DATABASE_URL": traced_database}
    env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    api, base_url = start_api(log_name="api-sampled-out", **env)
    body = {"model": MODEL, "prompt": "sampled out", "max_tokens": 1}
    try:
        dropped = httpx.post(f"{base_url}/v1/jobs", json=body, headers=AUTH, timeout=30)
        assert dropped.status_code == 202 and "traceparent" not in dropped.headers
        caller = "0af7651916cd43dd8448eb211c80319c"
        headers = AUTH | {"traceparent": f"00-{caller}-b7ad6b7169203331-01"}
        continued = httpx.post(f"{base_url}/v1/jobs", json=body, headers=headers, timeout=30)
        assert continued.status_code == 202 and trace_id_of(continued) == caller
    finally:
        stop_worker(api)
    spans = receiver.trace(caller, lambda s: "llmq.submit" in s and "POST /v1/jobs" in s)
    assert only(spans, "llmq.submit")["parent"] == only(spans, "POST /v1/jobs")["span_id"]
    with session_scope(traced_database) as session:
        stored = session.get(Job, uuid.UUID(dropped.json()["id"]))
        assert stored.trace_context is None  # its worker makes no spans for it
    dropped_id = dropped.json()["id"]
    time.sleep(0.5)  # two export schedules: anything made for the dropped request has arrived
    with receiver.lock:
        made = [
            span
            for spans in receiver.spans.values()
            for span in spans
            if dropped_id in str(span["attributes"])
        ]
    assert made == []
