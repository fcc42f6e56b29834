"""A model with no worker: its jobs wait in Postgres and its queue until a worker starts."""

import time

from tests.factories import start_worker, stop_worker, submit, wait_for_job, wait_for_queue


def test_job_for_model_without_worker_waits_then_completes_and_cancelled_never_runs(
    client, app, redis_url
):
    from redis import Redis

    from api.background.reconciler import waiting_job_ids

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny-offline"]["live"] is False

    waiting = submit(client, model="tiny-offline", prompt="wait for me", max_tokens=4)
    cancelled = submit(client, model="tiny-offline", prompt="never run me", max_tokens=4)
    assert waiting["queue"] == "llmq.tiny-offline.cpu"
    response = client.post(f"/v1/jobs/{cancelled['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    time.sleep(1)
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    in_broker = waiting_job_ids(Redis.from_url(redis_url), {"llmq.tiny-offline.cpu"})
    assert {waiting["id"], cancelled["id"]} <= in_broker

    process = start_worker("tiny-offline")
    try:
        wait_for_queue("llmq.tiny-offline.cpu", process)
        done = wait_for_job(client, waiting["id"])
        assert done["status"] == "succeeded"
        assert done["result"]["usage"]["completion_tokens"] >= 1
        app.state.live_queues.refresh()
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models["tiny-offline"]["live"] is True
        assert models["tiny-offline"]["live_queues"] == ["llmq.tiny-offline.cpu"]
    finally:
        stop_worker(process)

    never = client.get(f"/v1/jobs/{cancelled['id']}").json()
    assert never["status"] == "cancelled"
    assert never["attempts"] == 0 and never["started_at"] is None and never["result"] is None
