"""The model lifecycle with real workers and real models: one worker serving three seeded models
of different shapes while it holds one at a time (LRU eviction), the operator's load, unload,
forced unload and reload through the API and the CLI under load, and a SIGKILL during a load.

Expected texts come from each model alone, in this process (ModelHost + GenerationEngine)."""

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from db.session import session_scope
from db.tables import JobResult, Usage
from tests.factories import AUTH, stop_worker, wait_for_queue

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("life-a", "life-b", "life-c")
SHAPES = {
    "life-a": {},
    "life-b": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3},
    "life-c": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
}
SEEDS = {"life-a": 11, "life-b": 12, "life-c": 13}
PROMPTS = ["Once upon a time", "The queue holds", "A little girl", "Workers run many"]
MAX_TOKENS = 8
# Jobs long enough that some are surely running when a forced unload comes, however loaded the
# machine (with 8 tokens a fast worker could finish them all first).
LONG_JOB = {"max_tokens": 48, "ignore_eos": True}


def model_dir(model: str) -> Path:
    return Path(os.environ["LLMQ_DATA_DIR"]) / "lifecycle" / model


def write_model(model: str, seed: int) -> None:
    from llmq.tiny_model import ensure_tiny_model

    target = model_dir(model)
    staging = target.with_name(f"{model}-{seed}")
    ensure_tiny_model(staging, seed=seed, **SHAPES[model])
    if target.exists():
        for old in target.iterdir():
            old.unlink()
        target.rmdir()
    staging.rename(target)


def texts_alone(
    model: str, max_tokens: int = MAX_TOKENS, ignore_eos: bool = False
) -> dict[str, str]:
    """Each prompt's greedy text from the model alone, in this process."""
    from llmq.protocol import SamplingParams
    from llmq.registry import get_registry
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    spec = get_registry().get(model)
    host = ModelHost.load(spec, "cpu", Path(os.environ["LLMQ_DATA_DIR"]))
    engine = GenerationEngine(host, max_batch_size=4, max_batch_tokens=4096, max_wait_ms=1)
    engine.start()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        futures = {
            p: engine.submit(GenerationRequest(uuid.uuid4(), host.encode(p), params))
            for p in PROMPTS
        }
        return {p: f.result(timeout=60).text for p, f in futures.items()}
    finally:
        engine.stop()


def start_multi_worker(*extra: str, log_name: str) -> subprocess.Popen:
    log = open(Path(os.environ["LLMQ_DATA_DIR"]) / f"{log_name}.log", "ab")  # noqa: SIM115
    command = [sys.executable, "-m", "llmq.cli", "worker", "--device", "cpu"]
    for model in MODELS:
        command += ["--model", model]
    return subprocess.Popen(
        [*command, "--max-loaded-models", "1", *extra],
        cwd=ROOT,
        env=os.environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def expected(database_url):
    for model in MODELS:
        write_model(model, SEEDS[model])
    return {model: texts_alone(model) for model in MODELS}


@pytest.fixture(scope="module")
def multi_worker(expected, api_server):
    process = start_multi_worker(log_name="worker-lifecycle")
    try:
        for model in MODELS:
            wait_for_queue(f"llmq.{model}.cpu", process)
        yield process
    finally:
        stop_worker(process)


@pytest.fixture
def api(api_server):
    with httpx.Client(base_url=api_server, headers=AUTH, timeout=120) as client:
        yield client


def submit_all(api, bodies: list[dict], parallel: int = 1) -> list[str]:
    """The jobs' ids, in the bodies' order; `parallel` requests at a time."""

    def submit(body: dict) -> str:
        response = api.post("/v1/jobs", json={"max_tokens": MAX_TOKENS, **body})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(submit, bodies))


def wait_all(api, ids: list[str], timeout: float = 240) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    while len(done) < len(ids):
        for job_id in set(ids) - set(done):
            job = api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                done[job_id] = job
        assert time.monotonic() < deadline, f"{len(ids) - len(done)} jobs never ended"
        time.sleep(0.2)
    return done


def worker_report(api, name: str, timeout: float = 15) -> dict:
    """The worker's report; a busy worker (one loading a model on a loaded machine) may miss
    a broadcast's second."""
    deadline = time.monotonic() + timeout
    while True:
        workers = {w["name"]: w for w in api.get("/v1/admin/workers").json()["data"]}
        if name in workers:
            return workers[name]
        assert time.monotonic() < deadline, f"{name} did not answer; live: {sorted(workers)}"


def worker_name(api, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in api.get("/v1/admin/workers").json()["data"]:
            if worker["pid"] == process.pid:
                return worker["name"]
        time.sleep(0.3)
    raise AssertionError("the worker never answered llmq_models")


def stored_once(job_ids: list[str]) -> None:
    """Every job has exactly one result and one usage row."""
    ids = [uuid.UUID(j) for j in job_ids]
    with session_scope(os.environ["LLMQ_DATABASE_URL"]) as session:
        for table in (JobResult, Usage):
            counts = dict(
                session.execute(
                    select(table.job_id, func.count())
                    .where(table.job_id.in_(ids))
                    .group_by(table.job_id)
                ).all()
            )
            assert counts == dict.fromkeys(ids, 1), table.__tablename__


def cli(*args: str, base_url: str) -> subprocess.CompletedProcess:
    env = os.environ | {"LLMQ_API_URL": base_url, "COLUMNS": "300"}  # tables on one line
    return subprocess.run(
        [sys.executable, "-m", "llmq.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_sigkill_during_a_load_loses_no_job(expected, api, api_server):
    """Runs first: the module's worker, which serves the same queues, does not exist yet."""
    process = start_multi_worker(log_name="worker-lifecycle-killed")
    try:
        wait_for_queue("llmq.life-a.cpu", process)
        name = worker_name(api, process)
        ids = submit_all(
            api, [{"model": "life-b", "prompt": p, "cache": False} for p in PROMPTS * 3]
        )
        deadline = time.monotonic() + 60
        while True:
            states = {m["model"]: m["state"] for m in worker_report(api, name)["models"]}
            if states["life-b"] == "loading":
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        stop_worker(process)
    replacement = start_multi_worker(log_name="worker-lifecycle-replacement")
    try:
        jobs = wait_all(api, ids, timeout=300)
        assert all(j["status"] == "succeeded" for j in jobs.values())
        for job_id, prompt in zip(ids, PROMPTS * 3, strict=True):
            assert jobs[job_id]["result"]["text"] == expected["life-b"][prompt]
        stored_once(ids)
    finally:
        stop_worker(replacement)


def test_interleaved_jobs_of_three_models_on_one_slot_get_each_models_own_text(
    multi_worker, expected, api
):
    bodies = [
        {"model": model, "prompt": prompt, "cache": False} for prompt in PROMPTS for model in MODELS
    ]
    ids = submit_all(api, bodies)
    jobs = wait_all(api, ids)
    for job_id, body in zip(ids, bodies, strict=True):
        job = jobs[job_id]
        assert job["status"] == "succeeded", job
        assert job["result"]["text"] == expected[body["model"]][body["prompt"]], body
        # Evictions come between a model's jobs: none was cut and run again.
        assert job["attempts"] == 1, job
    stored_once(ids)

    report = worker_report(api, worker_name(api, multi_worker))
    assert report["max_loaded_models"] == 1 and len(report["models_loaded"]) <= 1
    assert sum(m["loads"] for m in report["models"]) >= 3  # each model was loaded at least once
    name = report["name"]
    # /v1/models reads the API's view of the workers, refreshed in the background.
    deadline = time.monotonic() + 15
    while True:
        models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
        loaded_on = [m for m in MODELS if name in models[m]["loaded_on"]]
        if loaded_on == worker_report(api, name)["models_loaded"]:
            break
        assert time.monotonic() < deadline, (loaded_on, worker_report(api, name))
        time.sleep(0.3)
    assert all(name in models[m]["workers"] for m in MODELS)


def test_load_unload_force_and_reload_under_load_lose_nothing(
    multi_worker, expected, api, api_server
):
    name = worker_name(api, multi_worker)
    base = f"/v1/admin/workers/{name}/models"

    # Load through the API: life-b takes the one place.
    loaded = api.post(f"{base}/life-b/load", params={"wait": 120})
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded", loaded.text
    assert worker_report(api, name)["models_loaded"] == ["life-b"]

    # 200 jobs in flight, then a forced unload: their model goes, they come back and finish.
    long_texts = texts_alone("life-b", **LONG_JOB)
    bodies = [
        {"model": "life-b", "prompt": PROMPTS[i % len(PROMPTS)], "cache": False, **LONG_JOB}
        for i in range(200)
    ]
    ids = submit_all(api, bodies, parallel=16)
    deadline = time.monotonic() + 60
    while worker_report(api, name)["jobs_running"] == 0:
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.05)
    forced = api.post(f"{base}/life-b/unload", params={"force": "true", "wait": 120})
    assert forced.status_code == 200, forced.text
    assert forced.json()["state"] in ("unloaded", "loading", "loaded")  # its jobs load it again
    jobs = wait_all(api, ids)
    assert all(j["status"] == "succeeded" for j in jobs.values())
    for job_id, body in zip(ids, bodies, strict=True):
        assert jobs[job_id]["result"]["text"] == long_texts[body["prompt"]]
    stored_once(ids)
    assert any(j["attempts"] > 1 for j in jobs.values()), "no job was handed back"

    # Unload through the CLI waits for running jobs; load through the CLI.
    ids = submit_all(api, [{"model": "life-a", "prompt": p, "cache": False} for p in PROMPTS])
    result = cli("models", "unload", "life-a", "--worker", name, base_url=api_server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unload of life-a" in result.stdout
    assert all(j["status"] == "succeeded" for j in wait_all(api, ids).values())
    result = cli("models", "load", "life-c", "--worker", name, base_url=api_server)
    assert result.returncode == 0 and "done (loaded)" in result.stdout, result.stdout
    listing = cli("workers", base_url=api_server)
    assert listing.returncode == 0 and name in listing.stdout and "life-c (loaded" in listing.stdout

    # New weights: cache an answer of life-c, swap its folder for a differently seeded model,
    # reload through the CLI; the answer is the new weights', never the cached old text.
    cached_body = {"model": "life-c", "prompt": PROMPTS[0]}
    [old_id] = submit_all(api, [cached_body])
    assert wait_all(api, [old_id])[old_id]["result"]["text"] == expected["life-c"][PROMPTS[0]]
    write_model("life-c", 99)
    new_texts = texts_alone("life-c")
    assert new_texts != expected["life-c"]
    under_load = submit_all(
        api, [{"model": "life-c", "prompt": p, "cache": False} for p in PROMPTS]
    )
    result = cli("models", "reload", "life-c", base_url=api_server)
    assert result.returncode == 0 and "reload of life-c" in result.stdout, result.stdout
    assert all(j["status"] == "succeeded" for j in wait_all(api, under_load).values())
    ids = submit_all(api, [cached_body] + [{"model": "life-c", "prompt": p} for p in PROMPTS])
    jobs = wait_all(api, ids)
    assert jobs[ids[0]]["cache_hit"] is False
    for job_id, prompt in zip(ids, [PROMPTS[0], *PROMPTS], strict=True):
        assert jobs[job_id]["result"]["text"] == new_texts[prompt]


def test_admin_commands_refuse_what_they_cannot_do(multi_worker, api):
    name = worker_name(api, multi_worker)
    unknown_worker = api.post("/v1/admin/workers/nobody@nowhere/models/life-a/load")
    assert unknown_worker.status_code == 404
    assert "no live worker named 'nobody@nowhere'" in unknown_worker.json()["error"]["message"]
    unknown_model = api.post(f"/v1/admin/workers/{name}/models/no-such-model/load")
    assert unknown_model.status_code == 404
    not_served = api.post(f"/v1/admin/workers/{name}/models/tiny-llama/load")
    assert not_served.status_code == 409
    assert "does not serve tiny-llama" in not_served.json()["error"]["message"]
    user = api.post("/v1/admin/keys", json={"name": "lifecycle user"}).json()["key"]
    refused = api.get("/v1/admin/workers", headers={"Authorization": f"Bearer {user}"})
    assert refused.status_code == 403
