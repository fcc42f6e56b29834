"""Admin endpoints: create, list, read, change and revoke API keys; recent failed jobs."""

import uuid

import pytest

from tests.factories import bearer, create_key, submit, wait_for_job

SUITE_DEFAULTS = {
    "rate_limit_per_minute": 0,
    "max_concurrent_jobs": 0,
    "monthly_token_quota": 0,
    "monthly_spend_limit": "0",
}


def test_created_key_is_shown_once(client):
    response = client.post("/v1/admin/keys", json={"name": "analytics"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["object"] == "api_key" and created["role"] == "user"
    assert created["key"].startswith(created["prefix"])
    own = {field: created[field] for field in SUITE_DEFAULTS}
    assert own == dict.fromkeys(SUITE_DEFAULTS)  # none of its own: the defaults apply
    assert created["limits"] == SUITE_DEFAULTS
    assert created["revoked_at"] is None and created["last_used_at"] is None

    read = client.get(f"/v1/admin/keys/{created['id']}").json()
    assert "key" not in read and read["prefix"] == created["prefix"]


def test_admin_key_with_its_own_limits(client):
    limits = {
        "rate_limit_per_minute": 60,
        "max_concurrent_jobs": 4,
        "monthly_token_quota": 10**12,
        "monthly_spend_limit": "12.5",
    }
    created = create_key(client, "ops", role="admin", **limits)
    assert created["role"] == "admin" and created["limits"] == limits
    assert client.get("/v1/admin/keys", headers=bearer(created["key"])).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "x", "rate_limit_per_minute": -1}, "'rate_limit_per_minute'"),
        ({"name": "x", "role": "root"}, "'role'"),
        ({"name": ""}, "'name'"),
        ({"name": "x", "key": "my own"}, "unknown field 'key'"),
        ({}, "'name' is required"),
    ],
)
def test_invalid_key_requests_are_400(client, body, message):
    response = client.post("/v1/admin/keys", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_list_keys_newest_first_with_or_without_revoked(client):
    older, newer = create_key(client, "older"), create_key(client, "newer")
    client.post(f"/v1/admin/keys/{older['id']}/revoke").raise_for_status()
    everyone = client.get("/v1/admin/keys", params={"limit": 500}).json()
    ids = [k["id"] for k in everyone["data"]]
    assert ids.index(newer["id"]) < ids.index(older["id"])
    assert everyone["total"] == len(ids)
    live = client.get("/v1/admin/keys", params={"include_revoked": False, "limit": 500}).json()
    assert newer["id"] in {k["id"] for k in live["data"]}
    assert older["id"] not in {k["id"] for k in live["data"]}
    page = client.get("/v1/admin/keys", params={"limit": 1, "offset": 1}).json()
    assert len(page["data"]) == 1 and page["total"] == everyone["total"]


def test_patch_changes_only_the_fields_sent(client):
    created = create_key(client, "before", rate_limit_per_minute=10, max_concurrent_jobs=3)
    path = f"/v1/admin/keys/{created['id']}"
    renamed = client.patch(path, json={"name": "after", "monthly_token_quota": 500}).json()
    assert renamed["name"] == "after"
    assert renamed["limits"] == {
        "rate_limit_per_minute": 10,
        "max_concurrent_jobs": 3,
        "monthly_token_quota": 500,
        "monthly_spend_limit": "0",
    }
    restored = client.patch(path, json={"rate_limit_per_minute": None}).json()
    assert restored["rate_limit_per_minute"] is None
    assert restored["limits"]["rate_limit_per_minute"] == SUITE_DEFAULTS["rate_limit_per_minute"]
    assert restored["max_concurrent_jobs"] == 3 and restored["name"] == "after"
    assert client.patch(path, json={}).json() == restored

    refused = client.patch(path, json={"name": None})
    assert refused.status_code == 400
    assert "name cannot be null" in refused.json()["error"]["message"]


def test_unknown_key_is_404(client):
    missing = uuid.uuid4()
    for method, path in [
        ("GET", f"/v1/admin/keys/{missing}"),
        ("PATCH", f"/v1/admin/keys/{missing}"),
        ("POST", f"/v1/admin/keys/{missing}/revoke"),
    ]:
        response = client.request(method, path, json={} if method == "PATCH" else None)
        assert response.status_code == 404, (method, response.text)
        assert response.json()["error"]["message"] == f"no API key with id {missing}"


def test_revoke_is_idempotent(client):
    created = create_key(client, "to revoke")
    first = client.post(f"/v1/admin/keys/{created['id']}/revoke")
    assert first.status_code == 200 and first.json()["revoked_at"] is not None
    again = client.post(f"/v1/admin/keys/{created['id']}/revoke").json()
    assert again["revoked_at"] == first.json()["revoked_at"]


def test_last_used_is_recorded(client):
    created = create_key(client, "used")
    assert client.get("/v1/models", headers=bearer(created["key"])).status_code == 200
    read = client.get(f"/v1/admin/keys/{created['id']}").json()
    assert read["last_used_at"] is not None and read["last_used_at"] >= read["created_at"]


def test_recent_failed_jobs_show_their_errors_and_keys(live_client):
    created = create_key(live_client, "unlucky")
    key = bearer(created["key"])
    # A deadline that has passed by the first decode step: the job fails with a timeout.
    doomed = submit(live_client, key, prompt="too slow", max_tokens=50, timeout_s=0.000001)
    assert wait_for_job(live_client, doomed["id"])["status"] == "failed"
    fine = submit(live_client, key, model="tiny-offline", prompt="cancelled")
    live_client.post(f"/v1/jobs/{fine['id']}/cancel", headers=key).raise_for_status()

    failed = live_client.get("/v1/admin/jobs", params={"owner": created["id"]}).json()
    assert [job["id"] for job in failed["data"]] == [doomed["id"]] and failed["total"] == 1
    job = failed["data"][0]
    assert job["owner"] == created["id"] and job["error"]["category"] == "timeout"
    everyone = live_client.get("/v1/admin/jobs", params={"limit": 500}).json()["data"]
    assert doomed["id"] in {j["id"] for j in everyone}
    assert {j["status"] for j in everyone} == {"failed"}
    cancelled = live_client.get(
        "/v1/admin/jobs", params={"status": "cancelled", "owner": created["id"]}
    ).json()
    assert [j["id"] for j in cancelled["data"]] == [fine["id"]]
