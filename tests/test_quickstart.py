"""The quick start as a user runs it: `make run` (python -m ops.devstack run) with the repository's
own models.yaml serves the default model, which answers "Once upon a time" with real English.

The stack gets a database of its own, free ports and its own data folder; it shares the suite's
Redis database (its queues are the default model's, which no other test consumes)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from db.admin import create_database, drop_database
from tests.factories import free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "quickstart-admin-key-0123456789"


@pytest.fixture
def quickstart_stack(database_url, redis_url, tmp_path):
    stack_db = make_url(database_url).set(database=make_url(database_url).database + "_qs")
    stack_db_url = stack_db.render_as_string(False)
    create_database(stack_db_url, replace=True)
    api_port = free_port()
    env = os.environ | {
        "LLMQ_DATABASE_URL": stack_db_url,
        "LLMQ_REDIS_URL": redis_url,
        "LLMQ_MODELS_FILE": str(ROOT / "models.yaml"),  # the file a clone ships with
        "LLMQ_DATA_DIR": str(tmp_path / "data"),
        "LLMQ_API_PORT": str(api_port),
        "LLMQ_FLOWER_PORT": str(free_port()),
        "LLMQ_WORKER_METRICS_PORT": "0",
        "LLMQ_BOOTSTRAP_ADMIN_KEY": KEY,
    }
    for name in ("LLMQ_WORKER_MODEL", "LLMQ_WORKER_DEVICE"):
        env.pop(name, None)
    log = open(tmp_path / "devstack.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.devstack", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while b"Ctrl-C stops everything" not in (tmp_path / "devstack.log").read_bytes():
            assert process.poll() is None, (tmp_path / "devstack.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "devstack.log").read_text()
            time.sleep(0.5)
        yield f"http://127.0.0.1:{api_port}", (tmp_path / "devstack.log")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        drop_database(stack_db_url)


def test_make_run_answers_once_upon_a_time_with_english(quickstart_stack):
    base_url, log = quickstart_stack
    banner = log.read_text()
    assert "stories260K" in banner and "llmq.stories260K." in banner
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        job = client.post(
            "/v1/jobs?wait=60",
            json={"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 24},
        )
        assert job.status_code == 202, job.text
        assert job.json()["status"] == "succeeded", job.text
        text = job.json()["result"]["text"]
        # Greedy decoding (the model's default temperature is 0): the pretrained model's story.
        assert text.startswith(", there was a little girl named Lily."), text

        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models][:2] == ["stories260K", "tiny-llama"]
