"""API keys: how they are sent, refused, revoked and stored; roles; the open endpoints; auth
turned off; the bootstrap key; the `llmq keys` CLI; and isolation between two keys on every
job, stream, OpenAI and evaluation endpoint."""

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from db.session import session_scope
from db.tables import ApiKey
from tests.evals.conftest import EVAL_DATA_ROOT, write_benchmarks
from tests.factories import (
    ROOT,
    api_client,
    bearer,
    create_key,
    start_api,
    stop_worker,
    submit,
    wait_for_job,
)

ADMIN_ONLY = [
    ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys"),
    ("GET", f"/v1/admin/keys/{uuid.uuid4()}"),
    ("PATCH", f"/v1/admin/keys/{uuid.uuid4()}"),
    ("POST", f"/v1/admin/keys/{uuid.uuid4()}/revoke"),
    ("GET", "/v1/admin/usage"),
    ("GET", "/v1/admin/jobs"),
]


@pytest.fixture
def user(client) -> dict:
    return create_key(client, "user one")


@pytest.fixture
def other(client) -> dict:
    return create_key(client, "user two")


def assert_unauthenticated(response, words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert words in error["message"]


def test_request_without_a_key_is_401_and_says_how_to_send_one(client):
    response = client.get("/v1/jobs", headers={"Authorization": ""})
    assert_unauthenticated(response, "Authorization: Bearer <key>' or 'X-API-Key: <key>'")


def test_unknown_key_is_401(client):
    response = client.get("/v1/models", headers=bearer("llmq_not-a-key-of-this-server"))
    assert_unauthenticated(response, "not valid")


def test_key_is_accepted_as_bearer_and_as_x_api_key(client, user):
    as_bearer = client.get("/v1/jobs", headers=bearer(user["key"]))
    as_header = client.get("/v1/jobs", headers={"Authorization": "", "X-API-Key": user["key"]})
    assert as_bearer.status_code == as_header.status_code == 200
    # An OpenAI client with a placeholder Bearer still gets in with X-API-Key.
    placeholder = {"Authorization": "Bearer unused", "X-API-Key": user["key"]}
    assert client.get("/v1/models", headers=placeholder).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
def test_probes_metrics_and_docs_need_no_key(client, path):
    assert client.get(path, headers={"Authorization": ""}).status_code == 200


def test_openapi_documents_both_ways_to_send_a_key(client):
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key",
    }
    assert schema["paths"]["/v1/jobs"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


@pytest.mark.parametrize(("method", "path"), ADMIN_ONLY)
def test_admin_endpoints_refuse_a_user_key_with_403(client, user, method, path):
    body = {"name": "x"} if method in ("POST", "PATCH") else None
    response = client.request(method, path, json=body, headers=bearer(user["key"]))
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error"
    assert "needs an admin key; key 'user one' has the user role" in error["message"]


def test_revoked_key_is_refused_at_once(client, user):
    headers = bearer(user["key"])
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert client.post(f"/v1/admin/keys/{user['id']}/revoke").status_code == 200
    assert_unauthenticated(client.get("/v1/jobs", headers=headers), "was revoked")


def test_revoked_key_is_refused_by_another_api_process(client, user, worker):
    api, base = start_api()
    try:
        with api_client(base, headers=bearer(user["key"])) as http:
            assert http.get("/v1/jobs").status_code == 200  # that process now trusts the key
            client.post(f"/v1/admin/keys/{user['id']}/revoke").raise_for_status()
            deadline = time.monotonic() + 30  # LLMQ_AUTH_CACHE_S later at the most
            while (response := http.get("/v1/jobs")).status_code == 200:
                assert time.monotonic() < deadline, "the other process still accepts the key"
                time.sleep(0.2)
            assert_unauthenticated(response, "was revoked")
    finally:
        stop_worker(api)


def test_key_is_stored_only_as_its_hash(client, database_url):
    created = create_key(client, "hashed")
    key = created["key"]
    assert key.startswith("llmq_") and len(key) > 40
    assert key.startswith(created["prefix"]) and len(created["prefix"]) == 12
    with session_scope(database_url) as session:
        row = session.scalars(select(ApiKey).where(ApiKey.id == uuid.UUID(created["id"]))).one()
        stored = [str(value) for value in vars(row).values()]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in value for value in stored)
    listed = client.get("/v1/admin/keys").json()["data"]
    assert all("key" not in entry for entry in listed)
    assert created["id"] in {entry["id"] for entry in listed}


def test_keys_never_reach_the_logs(worker):
    log_path = Path(os.environ["LLMQ_DATA_DIR"]) / "api.log"
    api, base = start_api(LLMQ_LOG_LEVEL="DEBUG")
    try:
        with api_client(base) as admin:
            key = create_key(admin, "logged?")["key"]
            assert admin.get("/v1/jobs", headers=bearer(key)).status_code == 200
            assert admin.get("/v1/jobs", headers=bearer(key + "x")).status_code == 401
    finally:
        stop_worker(api)
    text = log_path.read_text()
    assert "request served" in text
    assert key[12:] not in text  # neither the key nor the wrong one sent with it


def test_auth_off_lets_every_caller_in_as_an_admin(client, worker):
    mine = submit(client, model="tiny-offline", prompt="seen with auth off")
    api, base = start_api(LLMQ_AUTH="off")
    try:
        listed = httpx.get(f"{base}/v1/jobs", params={"limit": 500}).json()["data"]
        assert mine["id"] in {job["id"] for job in listed}  # everyone's jobs
        assert httpx.get(f"{base}/v1/admin/keys").status_code == 200
        created = httpx.post(
            f"{base}/v1/jobs", json={"model": "tiny-offline", "prompt": "anonymous"}
        ).json()
        assert httpx.post(f"{base}/v1/jobs/{created['id']}/cancel").status_code == 200
    finally:
        stop_worker(api)
    # Made without a key, the job belongs to no key: only admins see it.
    assert client.get(f"/v1/jobs/{created['id']}").status_code == 200


def test_bootstrap_key_is_stored_as_an_admin_key_at_start_up(worker):
    key = f"llmq_bootstrap-{uuid.uuid4().hex}"
    api, base = start_api(LLMQ_BOOTSTRAP_ADMIN_KEY=key)
    try:
        with api_client(base, headers=bearer(key)) as http:
            keys = http.get("/v1/admin/keys", params={"limit": 500})
            assert keys.status_code == 200
            mine = [k for k in keys.json()["data"] if k["prefix"] == key[:11]]  # a quarter
            assert [(k["name"], k["role"]) for k in mine] == [("bootstrap admin", "admin")]
    finally:
        stop_worker(api)


def llmq_keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmq.cli", "keys", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_creates_lists_and_revokes_keys(client):
    created = llmq_keys("create", "--name", "from the cli", "--admin", "--max-concurrent-jobs", "3")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()  # alone on stdout, for $(llmq keys create ...)
    assert key.startswith("llmq_") and "not shown again" in created.stderr
    me = client.get("/v1/me/usage", headers=bearer(key)).json()
    assert me["limits"]["max_concurrent_jobs"] == 3
    assert client.get("/v1/admin/keys", headers=bearer(key)).status_code == 200  # an admin

    listed = llmq_keys("list")
    assert listed.returncode == 0 and "from the cli" in listed.stdout
    assert key[:12] in listed.stdout and key[12:] not in listed.stdout

    revoked = llmq_keys("revoke", key[:12])
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked key" in revoked.stderr
    deadline = time.monotonic() + 30  # the API trusts what it read for LLMQ_AUTH_CACHE_S
    while (response := client.get("/v1/jobs", headers=bearer(key))).status_code == 200:
        assert time.monotonic() < deadline, "the API still accepts the revoked key"
        time.sleep(0.2)
    assert_unauthenticated(response, "was revoked")
    assert llmq_keys("revoke", "llmq_").returncode == 1  # matches many: names none


# Isolation: another key's job, stream or run is 404, as if it did not exist.


def test_a_key_sees_and_cancels_only_its_own_jobs(client, user, other):
    mine, theirs = bearer(user["key"]), bearer(other["key"])
    job = submit(client, headers=mine, model="tiny-offline", prompt="private")
    path = f"/v1/jobs/{job['id']}"
    for method, url in [("GET", path), ("POST", f"{path}/cancel"), ("GET", f"{path}/events")]:
        response = client.request(method, url, headers=theirs)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["message"] == f"no job with id {job['id']}"
    assert job["id"] not in {j["id"] for j in client.get("/v1/jobs", headers=theirs).json()["data"]}

    own = client.get("/v1/jobs", headers=mine).json()
    assert [j["id"] for j in own["data"]] == [job["id"]] and own["total"] == 1
    admin_view = client.get("/v1/jobs", params={"limit": 500}).json()["data"]
    assert job["id"] in {j["id"] for j in admin_view}  # admins see everyone's
    assert client.get(path).status_code == 200
    cancelled = client.post(f"{path}/cancel", headers=mine)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_a_key_streams_only_its_own_jobs(live_client, user, other):
    job = submit(live_client, bearer(user["key"]), prompt="mine", max_tokens=3, ignore_eos=True)
    wait_for_job(live_client, job["id"])
    theirs = live_client.get(f"/v1/jobs/{job['id']}/events", headers=bearer(other["key"]))
    assert theirs.status_code == 404
    mine = live_client.get(f"/v1/jobs/{job['id']}/events", headers=bearer(user["key"]))
    assert mine.status_code == 200 and "event: done" in mine.text


def test_openai_requests_make_jobs_of_their_key(live_client, user, other):
    body = {"model": "tiny-llama", "prompt": "openai isolation", "max_tokens": 2, "n": 2}
    response = live_client.post("/v1/completions", json=body, headers=bearer(user["key"]))
    assert response.status_code == 200, response.text
    mine = live_client.get("/v1/jobs", headers=bearer(user["key"])).json()["data"]
    assert [j["prompt"] for j in mine] == ["openai isolation"] * 2
    theirs = live_client.get("/v1/jobs", headers=bearer(other["key"])).json()
    assert theirs["total"] == 0
    for job in mine:
        response = live_client.get(f"/v1/jobs/{job['id']}", headers=bearer(other["key"]))
        assert response.status_code == 404
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = live_client.post("/v1/chat/completions", json=chat, headers=bearer(other["key"]))
    assert response.status_code == 200, response.text
    assert live_client.get("/v1/jobs", headers=bearer(other["key"])).json()["total"] == 1
    assert live_client.get("/v1/jobs", headers=bearer(user["key"])).json()["total"] == 2


def test_a_key_sees_and_cancels_only_its_own_eval_runs(client, user, other):
    write_benchmarks(EVAL_DATA_ROOT)
    mine, theirs = bearer(user["key"]), bearer(other["key"])
    body = {"benchmark": "mmlu", "model": "tiny-offline", "num_fewshot": 0, "subjects": ["anatomy"]}
    created = client.post("/v1/evals", json=body, headers=mine)
    assert created.status_code == 202, created.text
    run = created.json()
    path = f"/v1/evals/{run['id']}"
    for method, url in [("GET", path), ("GET", f"{path}/items"), ("POST", f"{path}/cancel")]:
        response = client.request(method, url, headers=theirs)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["message"] == f"no evaluation run with id {run['id']}"
    assert client.get("/v1/evals", headers=theirs).json()["total"] == 0
    assert [r["id"] for r in client.get("/v1/evals", headers=mine).json()["data"]] == [run["id"]]
    assert run["id"] in {r["id"] for r in client.get("/v1/evals").json()["data"]}  # admin

    # Its jobs are the key's: listed for it, hidden from the other.
    deadline = time.monotonic() + 30
    while not (jobs := client.get("/v1/jobs", headers=mine).json()["data"]):
        assert time.monotonic() < deadline, "the run's jobs never appeared"
        time.sleep(0.1)
    assert client.get(f"/v1/jobs/{jobs[0]['id']}", headers=theirs).status_code == 404
    assert client.post(f"{path}/cancel", headers=mine).json()["status"] == "cancelled"
