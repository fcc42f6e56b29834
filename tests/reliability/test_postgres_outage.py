"""Postgres unavailable: the API answers 503 with Retry-After, never 500, and readiness goes
red; a worker keeps its finished job's result and its message until Postgres is back.

A submission answered 503 stored nothing, and one that stored its jobs is answered with them,
wherever around the commit the connection breaks: the link in front of Postgres watches the
wire protocol and is cut at exactly that point.
"""

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import select

from db.session import session_scope
from db.tables import Job
from tests.factories import (
    AUTH,
    start_api,
    start_worker,
    stop_worker,
    submit,
    wait_for_job,
    wait_for_queue,
)
from tests.faults import LONG_JOB, QUEUE, CuttableLink, pump, running_on, wait_until

# Postgres wire protocol: the simple Query a client sends to commit, and the server's
# CommandComplete once the commit is done.
COMMIT_SENT = b"Q\x00\x00\x00\x0bCOMMIT\x00"
COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"
JOB_INSERT = b"INSERT INTO jobs"


class TripwireLink(CuttableLink):
    """A link that cuts itself at one point of one transaction: on the first connection that
    sends `armed_by` (client to server), when `at` next passes in the given direction, either
    just after it was delivered or instead of delivering it. `tripped` is set once cut."""

    def __init__(
        self, upstream_port: int, armed_by: bytes, at: bytes, to_server: bool, deliver: bool
    ) -> None:
        self.armed_by, self.at, self.to_server, self.deliver = armed_by, at, to_server, deliver
        self.tripped = threading.Event()
        super().__init__(upstream_port)

    def _relay_pair(self, client: socket.socket, server: socket.socket) -> None:
        armed = threading.Event()  # this connection sent `armed_by`
        for source, sink, to_server in ((client, server, True), (server, client, False)):
            watch = partial(self._passes, sink, to_server, armed)
            threading.Thread(target=pump, args=(source, sink, watch), daemon=True).start()

    def _passes(self, sink, to_server: bool, armed: threading.Event, data: bytes) -> bool:
        """False once this chunk trips the link, which it then cuts (after delivering the
        chunk, if `deliver`)."""
        if to_server and self.armed_by in data and not self.tripped.is_set():
            armed.set()
        trips = armed.is_set() and to_server == self.to_server and self.at in data
        if not trips or self.tripped.is_set():
            return True
        if self.deliver:
            sink.sendall(data)
        self.tripped.set()
        self.cut()
        return False


@pytest.fixture
def postgres_link(database_url):
    link = CuttableLink(5432)
    yield link
    link.close()


@pytest.fixture
def app_via_link(postgres_link, database_url, redis_url, tiny_model_path):
    """A second API whose every Postgres connection passes through the link."""
    from api.main import create_app
    from llmq.settings import get_settings

    settings = get_settings().model_copy(
        update={"database_url": postgres_link.url_for(database_url)}
    )
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert "unavailable" in response.json()["error"]["message"]


def test_api_answers_503_while_postgres_is_down(app_via_link, postgres_link):
    job = submit(app_via_link, model="tiny-offline", prompt="before the outage", max_tokens=2)
    assert app_via_link.get("/readyz").status_code == 200

    postgres_link.cut()
    body = {"model": "tiny-offline", "prompt": "during the outage", "max_tokens": 2}
    assert_unavailable(app_via_link.post("/v1/jobs", json=body))
    assert_unavailable(app_via_link.get(f"/v1/jobs/{job['id']}"))
    assert_unavailable(app_via_link.get("/v1/jobs"))
    ready = app_via_link.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["postgres"] != "ok"

    postgres_link.restore()
    assert app_via_link.get("/readyz").status_code == 200
    assert app_via_link.post("/v1/jobs", json=body).status_code == 202


def test_worker_holds_result_and_message_until_postgres_returns(
    client, postgres_link, database_url, redis_url, monkeypatch
):
    monkeypatch.setenv("LLMQ_DATABASE_URL", postgres_link.url_for(database_url))
    worker = start_worker("tiny-faults")
    monkeypatch.undo()
    try:
        wait_for_queue(QUEUE, worker)
        job = submit(client, prompt="outage", **LONG_JOB)
        wait_until(lambda: running_on(database_url, [job["id"]], worker.pid), 60, "the job to run")
        postgres_link.cut()
        time.sleep(6)  # the generation ends meanwhile; its result cannot be written

        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        unacked = Redis.from_url(redis_url).hvals("unacked")
        assert any(job["id"].encode() in message for message in unacked), "acked too early"

        postgres_link.restore()
        finished = wait_for_job(client, job["id"], timeout=60)
        assert finished["status"] == "succeeded"
        assert finished["result"]["usage"]["completion_tokens"] == LONG_JOB["max_tokens"]
        assert finished["attempts"] == 1
        wait_until(
            lambda: (
                not any(job["id"].encode() in m for m in Redis.from_url(redis_url).hvals("unacked"))
            ),
            10,
            "the message to be acknowledged",
        )
    finally:
        stop_worker(worker)


def jobs_of_request(database_url: str, request_id: str) -> list[Job]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(Job).where(Job.request_id == request_id)))


@pytest.fixture
def api_behind_tripwire(database_url, redis_url, tiny_model_path):
    """Starts an API process whose Postgres connections pass through a TripwireLink."""
    started: list = []

    def start(**tripwire) -> tuple[TripwireLink, str]:
        link = TripwireLink(5432, **tripwire)
        process, base_url = start_api(LLMQ_DATABASE_URL=link.url_for(database_url))
        started.append((link, process))
        return link, base_url

    yield start
    for link, process in started:
        link.close()
        stop_worker(process)


def post_across_the_cut(link: TripwireLink, base_url: str, path: str, body: dict, restore_s=None):
    """POST, cut the link where it is armed to, and restore it `restore_s` later (never if
    None). Returns the answer and the request's id."""
    request_id = f"cut-{uuid.uuid4().hex}"
    headers = AUTH | {"X-Request-ID": request_id}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post, f"{base_url}{path}", json=body, headers=headers, timeout=60
        )
        assert link.tripped.wait(30), "the link was never cut"
        if restore_s is not None:
            time.sleep(restore_s)
            link.restore()
        return answer.result(), request_id


def assert_told_what_was_stored(response, jobs: list[Job], accepted: int, choices: int = 1):
    """A 503 (with Retry-After) left no job; an accepted answer names every job stored."""
    if response.status_code == 503:
        assert int(response.headers["Retry-After"]) > 0
        assert jobs == [], f"answered 503, yet {len(jobs)} job(s) stored"
        return
    assert response.status_code == accepted, response.text
    assert len(jobs) == choices


OFFLINE_JOB = {"model": "tiny-offline", "prompt": "across the cut", "max_tokens": 1}
CUT_POINTS = {
    # The COMMIT never reaches Postgres: nothing is stored, and the client must hear so.
    "before_commit": dict(armed_by=JOB_INSERT, at=COMMIT_SENT, to_server=True, deliver=False),
    # Committed, and Postgres is gone as soon as the API knows it.
    "after_commit": dict(armed_by=JOB_INSERT, at=COMMIT_DONE, to_server=False, deliver=True),
}


@pytest.mark.parametrize("cut", CUT_POINTS)
def test_job_answered_503_was_never_stored(api_behind_tripwire, database_url, cut):
    link, base_url = api_behind_tripwire(**CUT_POINTS[cut])

    response, request_id = post_across_the_cut(link, base_url, "/v1/jobs", OFFLINE_JOB)

    jobs = jobs_of_request(database_url, request_id)
    assert_told_what_was_stored(response, jobs, accepted=202)
    expected = {"before_commit": 503, "after_commit": 202}[cut]
    assert response.status_code == expected, response.text
    if response.status_code == 202:
        assert response.json()["id"] == str(jobs[0].id)


def test_job_whose_commit_answer_was_lost_is_answered_202(api_behind_tripwire, database_url):
    """Postgres committed, but its answer never arrived: the API asks again on a new
    connection once the link is back (within its bound) and finds the job."""
    link, base_url = api_behind_tripwire(
        armed_by=JOB_INSERT, at=COMMIT_DONE, to_server=False, deliver=False
    )

    response, request_id = post_across_the_cut(
        link, base_url, "/v1/jobs", OFFLINE_JOB, restore_s=1.0
    )

    (job,) = jobs_of_request(database_url, request_id)
    assert response.status_code == 202, response.text
    assert response.json()["id"] == str(job.id)


def test_openai_choices_are_stored_all_or_none(api_behind_tripwire, database_url, worker):
    """n choices are one transaction: the cut after its commit still gets every choice (the
    worker runs them; the answer comes through Redis), never a 503 for stored jobs."""
    link, base_url = api_behind_tripwire(**CUT_POINTS["after_commit"])
    body = {
        "model": "tiny-llama",
        "prompt": "Once upon a time",
        "n": 3,
        "max_tokens": 2,
        "cache": False,
    }

    response, request_id = post_across_the_cut(link, base_url, "/v1/completions", body)

    jobs = jobs_of_request(database_url, request_id)
    assert_told_what_was_stored(response, jobs, accepted=200, choices=3)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3
