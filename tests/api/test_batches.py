"""The Batch API with the official `openai` oai: upload, create, poll, download, join on
custom_id; validation errors with line numbers; cancel; expiry; batch priority."""

import io
import json
import time

import openai
import pytest
from sqlalchemy import update

from db.session import session_scope
from db.tables import Batch, Job
from llmq.registry import get_registry
from tests.factories import (
    ADMIN_KEY,
    api_client,
    create_key,
    start_api,
    start_worker,
    stop_worker,
    submit,
    wait_for_job,
    wait_for_queue,
)


@pytest.fixture
def oai(api_server):
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=ADMIN_KEY, max_retries=0)


def jsonl(lines: list[dict | str]) -> io.BytesIO:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return io.BytesIO(text.encode())


def chat_line(custom_id: str, content: str, model: str = "tiny-llama", **body) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        **body,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def wait_for_batch(
    oai,
    batch_id: str,
    until=("completed", "failed", "cancelled", "expired"),
    timeout_s: float = 120,
):
    deadline = time.monotonic() + timeout_s
    while (batch := oai.batches.retrieve(batch_id)).status not in until:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.3)
    return batch


def records(oai, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    content = oai.files.content(file_id).content.decode()
    return {r["custom_id"]: r for r in map(json.loads, content.splitlines())}


def test_chat_batch_runs_to_completion_and_joins_on_custom_id(oai, worker, api_server):
    lines = [chat_line(f"q{i}", f"Tell me about {i}") for i in range(5)]
    lines.append(chat_line("too-long", "word " * 400))  # refused when queued: over the context
    lines.append({**chat_line("wrong-url", "x"), "url": "/v1/embeddings"})
    lines.append(chat_line("q0", "the same custom_id again"))
    upload = oai.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0

    batch = oai.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "tests"},
    )
    assert batch.status == "validating" and batch.metadata == {"project": "tests"}
    batch = wait_for_batch(oai, batch.id)

    assert batch.status == "completed", batch
    assert batch.request_counts.total == 8
    assert batch.request_counts.completed == 5 and batch.request_counts.failed == 3
    codes = [(e.line, e.code) for e in batch.errors.data]
    assert codes == [(7, "invalid_url"), (8, "duplicate_custom_id")]
    assert batch.completed_at >= batch.finalizing_at >= batch.in_progress_at >= batch.created_at

    output = records(oai, batch.output_file_id)
    assert set(output) == {f"q{i}" for i in range(5)}
    for record in output.values():
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 6
        job = wait_for_job(api_client(api_server), record["response"]["request_id"])
        assert job["result"]["text"] == body["choices"][0]["message"]["content"]
    errors = records(oai, batch.error_file_id)
    assert errors["too-long"]["error"]["code"] == "context_length_exceeded"
    assert {r["error"]["line"] for r in errors.values()} >= {6}


def test_file_with_no_valid_line_fails_with_line_numbers(oai):
    bad_body = chat_line("a", "hi")
    bad_body["body"]["temperature"] = "hot"
    lines = [
        bad_body,
        "{not json",
        chat_line("b", "hi", model="gpt-9"),
        {**chat_line("c", "hi"), "method": "GET"},
        chat_line("", "no id"),
    ]
    upload = oai.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (1, "invalid_body"),
        (2, "invalid_json"),
        (3, "model_not_found"),
        (4, "invalid_method"),
        (5, "invalid_custom_id"),
    ]
    assert "temperature" in batch.errors.data[0].message


def create_batch(oai, lines: list[dict], name: str = "requests.jsonl"):
    upload = oai.files.create(file=(name, jsonl(lines)), purpose="batch")
    return oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def offline_batch(oai, count: int, timeout_s: float = 120):
    """A batch in progress (within `timeout_s`) whose lines wait on a model no worker serves."""
    lines = [chat_line(f"w{i}", "never runs", model="tiny-offline") for i in range(count)]
    batch = create_batch(oai, lines)
    wait_for_batch(oai, batch.id, until=("in_progress",), timeout_s=timeout_s)
    return batch


def test_cancel_drops_queued_lines(oai):
    batch = offline_batch(oai, 4)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.output_file_id is None
    errors = records(oai, batch.error_file_id)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)


def test_batch_past_its_window_expires(oai, database_url):
    batch = offline_batch(oai, 2)
    with session_scope(database_url) as session:  # the clock: pretend 24 hours went by
        session.execute(
            update(Batch).where(Batch.id == batch.id).values(expires_at=Batch.created_at)
        )
    batch = wait_for_batch(oai, batch.id)
    assert batch.status == "expired" and batch.expired_at
    errors = records(oai, batch.error_file_id)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_expired"}


def test_files_are_listed_read_and_deleted(oai):
    upload = oai.files.create(file=("list.jsonl", jsonl([chat_line("x", "y")])), purpose="batch")
    assert upload.id in {f.id for f in oai.files.list()}
    assert oai.files.retrieve(upload.id).filename == "list.jsonl"
    assert json.loads(oai.files.content(upload.id).content)["custom_id"] == "x"
    assert oai.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(upload.id)
    with pytest.raises(openai.BadRequestError):
        oai.files.create(file=("x.jsonl", jsonl(["{}"])), purpose="fine-tune")


def test_batches_are_listed_newest_first_and_paged(oai):
    upload = oai.files.create(file=("p.jsonl", jsonl([chat_line("p", "q")])), purpose="batch")
    made = [
        oai.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    first = oai.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = oai.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]


def test_batch_lines_are_released_a_window_at_a_time(live_client, database_url, api_server, oai):
    window = get_registry().get("tiny-faults").background_window  # no worker yet: one's worth
    lines = [chat_line(f"b{i}", f"batch {i}", model="tiny-faults") for i in range(60)]
    upload = oai.files.create(file=("window.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while _queued(database_url, batch.id) < window:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)  # a few more sweeps of the driver release nothing more
    assert _queued(database_url, batch.id) == window
    interactive = submit(live_client, model="tiny-faults", prompt="me first", max_tokens=4)

    worker = start_worker("tiny-faults")
    try:
        wait_for_queue("llmq.tiny-faults.cpu", worker)
        job = wait_for_job(live_client, interactive["id"])
        assert job["status"] == "succeeded"
        # The window refills as lines finish, until every line ran.
        batch = wait_for_batch(oai, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 60
    finally:
        stop_worker(worker)


def _queued(database_url: str, batch_id: str) -> int:
    with session_scope(database_url) as session:
        return session.query(Job).filter(Job.batch_id == batch_id, Job.status == "queued").count()


def test_files_and_batches_belong_to_their_key(oai, api_server):
    admin = api_client(api_server)
    alice, bob = (
        openai.OpenAI(
            base_url=f"{api_server}/v1", api_key=create_key(admin, name)["key"], max_retries=0
        )
        for name in ("alice", "bob")
    )
    batch = create_batch(alice, [chat_line("mine", "hi", model="tiny-offline")])
    alice.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    assert batch.id not in {b.id for b in bob.batches.list()}
    assert batch.input_file_id not in {f.id for f in bob.files.list()}
    assert oai.batches.retrieve(batch.id).id == batch.id  # admins see every key's
    alice.batches.cancel(batch.id)


@pytest.mark.usefixtures("database_url", "redis_url", "tiny_model_path")
def test_an_idle_driver_takes_up_a_new_batch_and_its_cancel_at_once():
    """Its API process wakes the batch driver when a batch is created or cancelled: with the
    driver's intervals an hour long, both still move at once."""
    process, base_url = start_api(
        LLMQ_BATCH_INTERVAL_S="3600", LLMQ_BACKGROUND_IDLE_INTERVAL_S="3600"
    )
    try:
        oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0)
        batch = offline_batch(oai, 1, timeout_s=15)
        oai.batches.cancel(batch.id)
        assert wait_for_batch(oai, batch.id, timeout_s=15).status == "cancelled"
    finally:
        stop_worker(process)
