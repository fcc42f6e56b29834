"""Request ids: a safe X-Request-ID from the client is kept, anything else replaced; either way
it comes back in the response header and is stored with the jobs the request created."""

import re
import uuid

import pytest
from sqlalchemy import select

from db.session import session_scope
from db.tables import Job

GENERATED = re.compile(r"[0-9a-f]{32}")


def create(client, headers: dict | None = None):
    body = {"model": "tiny-offline", "prompt": "trace me", "max_tokens": 2}
    response = client.post("/v1/jobs", json=body, headers=headers or {})
    assert response.status_code == 202, response.text
    client.post(f"/v1/jobs/{response.json()['id']}/cancel")
    return response


def test_client_request_id_echoed_and_stored_with_the_job(client):
    request_id = f"client-{uuid.uuid4().hex[:12]}"
    response = create(client, {"X-Request-ID": request_id})

    assert response.headers["X-Request-ID"] == request_id
    assert response.json()["request_id"] == request_id
    assert client.get(f"/v1/jobs/{response.json()['id']}").json()["request_id"] == request_id


def test_missing_request_id_generated_and_stored(client):
    first, second = create(client), create(client)

    generated = first.headers["X-Request-ID"]
    assert GENERATED.fullmatch(generated), generated
    assert first.json()["request_id"] == generated
    assert second.headers["X-Request-ID"] != generated


@pytest.mark.parametrize(
    "unsafe",
    ["x" * 65, "has space", "semi;colon", 'quote"d', "back\\slash", "ünïcode"],
)
def test_unsafe_request_id_replaced(client, unsafe):
    response = create(client, {"X-Request-ID": unsafe.encode()})

    replaced = response.headers["X-Request-ID"]
    assert replaced != unsafe and GENERATED.fullmatch(replaced)
    assert response.json()["request_id"] == replaced


def test_longest_safe_request_id_kept(client):
    longest = "a1._:-" * 10 + "abcd"
    assert len(longest) == 64
    assert create(client, {"X-Request-ID": longest}).headers["X-Request-ID"] == longest


def test_error_responses_carry_the_request_id(client):
    response = client.post(
        "/v1/jobs", json={"model": "no-such-model", "prompt": "x"}, headers={"X-Request-ID": "e-1"}
    )
    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "e-1"
    assert (
        client.get("/v1/nowhere", headers={"X-Request-ID": "e-2"}).headers["X-Request-ID"] == "e-2"
    )


def test_openai_request_id_stored_with_each_choice(live_client, database_url):
    request_id = f"openai-{uuid.uuid4().hex[:12]}"
    response = live_client.post(
        "/v1/completions",
        json={"model": "tiny-llama", "prompt": "Once", "max_tokens": 2, "n": 2},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == request_id
    with session_scope(database_url) as session:
        jobs = session.scalars(select(Job).where(Job.request_id == request_id)).all()
    assert len(jobs) == 2


def test_unhandled_error_answers_500_with_the_request_id():
    """On an app of its own: the real one has no route that fails on purpose."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.http.middleware import RequestContextMiddleware

    broken = FastAPI()
    broken.add_middleware(RequestContextMiddleware)

    @broken.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(broken, raise_server_exceptions=False) as test_client:
        response = test_client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "boom-1"
    assert response.json()["error"]["type"] == "server_error"
    assert "boom-1" in response.json()["error"]["message"]
