"""The engine in a process of its own (workers/engine_process.py), on the real tiny model: it
answers as the in-process engine does, and neither of its two processes outlives the other."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from llmq.protocol import FinishReason, SamplingParams
from tests.factories import ROOT

PROMPTS = ["Once upon a time", "The dog", "Hello 🙂 漢字", "x", "0 1 2 3"]
OPTIONS = {"max_batch_size": 8, "max_batch_tokens": 100_000, "max_wait_ms": 5}

# The worker side in a process of its own, for the tests that kill one side: it starts an
# engine process, prints its pid, keeps it decoding a long job, and waits.
WORKER_SIDE = """
import sys, time, uuid
from pathlib import Path
from llmq.logs import configure_logging
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from workers.engine import GenerationRequest
from workers.engine_process import EngineConfig, EngineProcess
from workers.host import TokenizerHost

configure_logging(json=False)  # on stderr: stdout carries the pid
path = Path(sys.argv[1])
spec = ModelSpec(id="tiny-llama", source=str(path), context_length=16_384)
host = TokenizerHost.load(spec, "cpu", path.parent)
engine = EngineProcess(host, EngineConfig(spec, "cpu", path.parent, {OPTIONS}))
engine.start()
params = SamplingParams(max_tokens=8000, ignore_eos=True)
engine.submit(GenerationRequest(uuid.uuid4(), host.encode("Once"), params))
print(engine.pid, flush=True)
time.sleep(600)
""".replace("{OPTIONS}", repr(OPTIONS))


@pytest.fixture(scope="module")
def spec(tiny_model_path):
    from llmq.registry import ModelSpec

    return ModelSpec(id="tiny-llama", source=str(tiny_model_path), context_length=512)


@pytest.fixture(scope="module")
def host(spec, tiny_model_path):
    from workers.host import ModelHost

    return ModelHost.load(spec, "cpu", tiny_model_path.parent)


@pytest.fixture(scope="module")
def deltas():
    """Every token delta the engine process has handed to the worker side, in order."""
    return []


@pytest.fixture(scope="module")
def engine_process(spec, tiny_model_path, deltas):
    from workers.engine_process import EngineConfig, EngineProcess
    from workers.host import TokenizerHost

    tokenizer_host = TokenizerHost.load(spec, "cpu", tiny_model_path.parent)
    config = EngineConfig(spec, "cpu", tiny_model_path.parent, OPTIONS)
    engine = EngineProcess(tokenizer_host, config, on_tokens=deltas.extend)
    engine.start(timeout=120)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def in_process_engine(host):
    from workers.engine import GenerationEngine

    engine = GenerationEngine(host, **OPTIONS)
    engine.start()
    yield engine
    engine.stop()


def request(host, prompt, **params):
    from workers.engine import GenerationRequest

    params.setdefault("max_tokens", 12)
    return GenerationRequest(uuid.uuid4(), host.encode(prompt), SamplingParams(**params))


def test_greedy_generation_equals_the_in_process_engines(
    host, engine_process, in_process_engine, deltas
):
    requests = [request(host, p, max_tokens=20, ignore_eos=True) for p in PROMPTS]
    there = [f.result(60) for f in [engine_process.submit(r) for r in requests]]
    here = [f.result(60) for f in [in_process_engine.submit(r) for r in requests]]

    assert [o.text for o in there] == [o.text for o in here]
    assert [(o.finish_reason, o.completion_tokens, o.prompt_tokens) for o in there] == [
        (o.finish_reason, o.completion_tokens, o.prompt_tokens) for o in here
    ]
    # The deltas reached this side too, and add up to each job's text.
    for req, output in zip(requests, there, strict=True):
        mine = [d.event.text for d in deltas if d.event.job_id == req.job_id]
        assert "".join(mine) == output.text
    assert engine_process.steps >= 20
    assert engine_process.active_job_ids() == []


def test_scoring_equals_the_in_process_engines(engine_process, in_process_engine, host):
    from workers.pairs import PairEncoder
    from workers.scoring import ScoreRequest

    encoder = PairEncoder(host.tokenizer)
    pairs = encoder.pairs("Question: 2 + 2?\nAnswer:", [" A", " B", " four"])
    score = ScoreRequest(uuid.uuid4(), pairs, 512)
    there = engine_process.submit_score(score).result(60)
    here = in_process_engine.submit_score(score).result(60)
    assert there.loglikelihoods == pytest.approx(here.loglikelihoods, abs=1e-5)
    assert there.greedy == here.greedy and there.input_tokens == here.input_tokens


def test_cancel_ends_a_running_job_and_spares_its_neighbour(host, engine_process):
    doomed = request(host, "Once upon a time", max_tokens=400, ignore_eos=True)
    neighbour = request(host, "The dog", max_tokens=100, ignore_eos=True)
    steps = engine_process.steps
    futures = [engine_process.submit(doomed), engine_process.submit(neighbour)]
    assert set(engine_process.active_job_ids()) == {doomed.job_id, neighbour.job_id}
    while engine_process.steps == steps:
        time.sleep(0.001)
    engine_process.cancel(doomed.job_id)
    cancelled, finished = (f.result(60) for f in futures)
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert cancelled.completion_tokens < 400
    assert finished.completion_tokens == 100


def test_a_bad_request_fails_its_caller_alone(host, engine_process):
    from workers.engine import GenerationRequest, JobTimeout

    poison = GenerationRequest(uuid.uuid4(), [1, 10**9], SamplingParams(max_tokens=4))
    late = request(host, "The dog", max_tokens=50)
    late = GenerationRequest(late.job_id, late.prompt_ids, late.params, deadline=time.monotonic())
    futures = [
        engine_process.submit(request(host, "The dog")),
        engine_process.submit(poison),
        engine_process.submit(late),
    ]
    assert futures[0].result(60).completion_tokens >= 1
    with pytest.raises(IndexError):
        futures[1].result(60)
    with pytest.raises(JobTimeout):
        futures[2].result(60)


def test_a_model_that_does_not_load_fails_start(spec, tiny_model_path, tmp_path):
    from workers.engine_process import EngineConfig, EngineProcess
    from workers.host import TokenizerHost

    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model_path, weightless)
    for weights in weightless.glob("*.safetensors"):
        weights.unlink()
    broken = spec.model_copy(update={"source": str(weightless)})
    host = TokenizerHost.load(broken, "cpu", tmp_path)
    engine = EngineProcess(host, EngineConfig(broken, "cpu", tmp_path, OPTIONS))
    with pytest.raises(RuntimeError, match="could not load the model"):
        engine.start(timeout=120)


@pytest.fixture
def worker_side(tiny_model_path):
    """(worker-side process, its engine process's pid), the engine decoding."""
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_SIDE, str(tiny_model_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.strip().isdigit(), process.stderr.read() if process.poll() else line
        yield process, int(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killing_the_engine_process_ends_the_worker_process(worker_side):
    from workers.engine_process import ENGINE_LOST_EXIT

    process, engine_pid = worker_side
    os.kill(engine_pid, signal.SIGKILL)
    assert process.wait(timeout=30) == ENGINE_LOST_EXIT
    assert "the engine process died" in process.stderr.read()


def test_killing_the_worker_process_ends_the_engine_process(worker_side):
    process, engine_pid = worker_side
    assert not gone(engine_pid)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while not gone(engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived its worker"
        time.sleep(0.1)
