"""A model kept in an object store loads from this host's copy: it writes what the same model
written from its folder does, and two workers on one host download it once."""

import os
import time
import uuid
from pathlib import Path

from api.intake.enqueue import producer
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from tests.conftest import STORIES
from tests.factories import api_client, start_api, start_worker, stop_worker, wait_for_job
from tests.s3_server import Fault

PROMPT = "Once upon a time"
MODEL_FILES = sorted(p.name for p in STORIES.iterdir() if p.is_file())


def greedy_text(spec: ModelSpec, data_dir) -> str:
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    host = ModelHost.load(spec, "cpu", data_dir)
    engine = GenerationEngine(host, max_batch_size=4, max_batch_tokens=4096, max_wait_ms=1)
    engine.start()
    try:
        request = GenerationRequest(
            uuid.uuid4(), host.encode(PROMPT), SamplingParams(max_tokens=24)
        )
        return engine.submit(request).result(timeout=60).text
    finally:
        engine.stop()


def test_an_s3_model_writes_what_the_same_local_model_writes(s3_model, s3_endpoint, tmp_path):
    from workers.host import TokenizerHost

    options = {"endpoint_url": s3_endpoint}
    stored = ModelSpec(id="stories-s3", source=s3_model, storage_options=options)
    local = ModelSpec(id="stories260K", source=str(STORIES))

    text = greedy_text(stored, tmp_path)

    assert text == greedy_text(local, tmp_path)
    assert "there was" in text or "little" in text, text
    tokenizer = TokenizerHost.load(stored, "cpu", tmp_path)
    assert tokenizer.encode(PROMPT) == TokenizerHost.load(local, "cpu", tmp_path).encode(PROMPT)


def consumers(queue: str) -> int:
    replies = producer().control.inspect(timeout=1).active_queues() or {}
    return sum(1 for qs in replies.values() if any(q["name"] == queue for q in qs))


def test_two_workers_on_one_host_download_an_s3_model_once(
    database_url, redis_url, s3_model, s3_proxy, tmp_path
):
    """Each worker's process and its engine process ask for the model: four processes, one
    download. The API on the same host then counts prompts with the workers' copy."""
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  - id: stories-s3\n"
        f"    source: {s3_model}\n"
        f"    storage_options: {{endpoint_url: '{s3_proxy.endpoint}'}}\n"
        "    devices: [cpu]\n"
        "    context_length: 512\n"
        "    max_batch_size: 4\n"
    )
    env = {"LLMQ_MODELS_FILE": str(models_file), "LLMQ_DATA_DIR": str(tmp_path / "data")}
    # The weights come slowly, so that every process asks while the first still downloads.
    s3_proxy.faults.append(Fault("GET", "model.safetensors", "delay", seconds=2))
    logs_dir = Path(os.environ["LLMQ_DATA_DIR"])  # start_worker's, whatever env says
    for old in logs_dir.glob("worker-stories-s3-*.log"):
        old.unlink()
    workers = [
        start_worker("stories-s3", log_name=f"worker-stories-s3-{n}", **env) for n in range(2)
    ]
    api = None
    try:
        deadline = time.monotonic() + 180
        while consumers("llmq.stories-s3.cpu") < 2:
            assert all(w.poll() is None for w in workers), "a worker exited; see its log"
            assert time.monotonic() < deadline, "the workers never consumed their queue"
            time.sleep(0.5)
        downloads = {name: s3_proxy.gets(name) for name in MODEL_FILES}
        assert downloads == dict.fromkeys(MODEL_FILES, 1)
        logs = "".join(log.read_text() for log in logs_dir.glob("worker-stories-s3-*.log"))
        assert logs.count("model downloaded") == 1, logs
        assert "using another process's download" in logs, logs

        api, base_url = start_api(log_name="api-stories-s3", **env)
        with api_client(base_url, timeout=30) as client:
            response = client.post(
                "/v1/jobs", json={"model": "stories-s3", "prompt": PROMPT, "max_tokens": 12}
            )
            assert response.status_code == 202, response.text
            job = wait_for_job(client, response.json()["id"], timeout=60)
        assert job["status"] == "succeeded", job
        assert job["result"]["usage"]["prompt_tokens"] == 5, job["result"]
        assert job["result"]["text"], job["result"]
        assert {name: s3_proxy.gets(name) for name in MODEL_FILES} == downloads
    finally:
        for process in (*workers, *([api] if api else [])):
            stop_worker(process)
