"""A trace receiver for tests: OTLP/HTTP exports from the processes under test, kept as plain
spans by trace id, and the helpers that read them."""

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from sqlalchemy.engine import make_url

from bench.otlp import OtlpReceiver
from db.admin import create_database, drop_database, migrate


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

    def linked_to(self, trace_id: str) -> dict[str, dict[str, list[dict]]]:
        """The traces (by id, their spans by name) holding a span linked to `trace_id`."""
        with self.lock:
            linked = {
                other: spans
                for other, spans in self.spans.items()
                if any(trace_id in span["links"] for span in spans)
            }
            return {other: _by_name(spans) for other, spans in linked.items()}

    def trace(self, trace_id: str, until, timeout: float = 30) -> dict[str, list[dict]]:
        """The trace's spans by name, once `until(spans by name)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                by_name = _by_name(self.spans.get(trace_id, []))
            if until(by_name):
                return by_name
            assert time.monotonic() < deadline, f"trace incomplete: {sorted(by_name)}"
            time.sleep(0.1)


def _by_name(spans: list[dict]) -> dict[str, list[dict]]:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        by_name[span["name"]].append(span)
    return by_name


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


def trace_id_of(response: httpx.Response) -> str:
    traceparent = response.headers["traceparent"]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, flags) == ("00", "01")
    return trace_id


def only(spans: dict, name: str) -> dict:
    assert len(spans[name]) == 1, f"{len(spans[name])} {name} spans"
    return spans[name][0]


def finished_mmlu_run(client: httpx.Client, model: str) -> tuple[str, list[dict]]:
    """The id and items of a 0-shot MMLU run on `model` (the two anatomy questions of the
    evaluation fixtures' data, which the caller writes), once it has succeeded."""
    body = {"benchmark": "mmlu", "model": model, "num_fewshot": 0, "subjects": ["anatomy"]}
    created = client.post("/v1/evals", json=body)
    assert created.status_code == 202, created.text
    run_id = created.json()["id"]
    deadline = time.monotonic() + 120
    while (run := client.get(f"/v1/evals/{run_id}").json())["status"] != "succeeded":
        assert run["status"] in ("queued", "running"), run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    return run_id, client.get(f"/v1/evals/{run_id}/items").json()["data"]


@contextmanager
def own_database(database_url: str, suffix: str) -> Iterator[str]:
    """A database of its own beside the session's, migrated, dropped afterwards. An API on it is
    the only one whose background drivers take its batches and evaluation runs (the session's
    API processes would otherwise share them, untraced)."""
    url = make_url(database_url)
    url = url.set(database=f"{url.database}_{suffix}").render_as_string(False)
    create_database(url, replace=True)
    migrate(url)
    try:
        yield url
    finally:
        drop_database(url)
