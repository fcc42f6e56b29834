"""Models load through from_pretrained, whether llmq built them or they came from elsewhere."""

import uuid
from pathlib import Path

import pytest

from api.intake.enqueue import producer
from llmq.registry import load_registry
from tests.factories import start_worker, stop_worker

STORIES = Path(__file__).resolve().parents[2] / "models" / "stories260K"  # ships with llmq


def test_tiny_model_build_is_deterministic(tmp_path):
    import torch

    from llmq.tiny_model import build_model, build_tokenizer

    first, second = build_tokenizer(), build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    a, b = build_model(len(first)).state_dict(), build_model(len(second)).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_tokenizer_round_trips_unicode(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "Ünïcödé 🙂 漢字 and plain words"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_registry_resolves_relative_sources_and_builtin_paths(tmp_path):
    model_dir = tmp_path / "weights" / "m"
    model_dir.mkdir(parents=True)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n  - id: local\n    source: weights/m\n    devices: [cpu, cuda]\n"
        "  - id: tiny\n    source: builtin:tiny-llama\n"
    )
    registry = load_registry(models_file)
    local, tiny = registry.get("local"), registry.get("tiny")
    assert local.source == str(model_dir)
    assert local.queue("cuda") == "llmq.local.cuda"
    assert tiny.local_path(tmp_path / "data") == tmp_path / "data" / "models" / "tiny-llama"


def test_registry_rejects_unknown_keys(tmp_path):
    models_file = tmp_path / "models.yaml"
    models_file.write_text("models:\n  - id: m\n    source: x\n    max_batch: 4\n")
    with pytest.raises(ValueError, match="max_batch"):
        load_registry(models_file)


def test_pretrained_stories_model_serves_through_an_entry(tmp_path):
    from llmq.protocol import SamplingParams
    from llmq.registry import ModelSpec
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    spec = ModelSpec(id="stories260K", source=str(STORIES), context_length=512)
    host = ModelHost.load(spec, "cpu", tmp_path)
    engine = GenerationEngine(host, max_batch_size=4, max_batch_tokens=4096, max_wait_ms=1)
    engine.start()
    try:
        request = GenerationRequest(
            uuid.uuid4(), host.encode("Once upon a time"), SamplingParams(max_tokens=12)
        )
        text = engine.submit(request).result(timeout=60).text
    finally:
        engine.stop()
    assert "there was" in text or "little" in text, text


def test_worker_that_cannot_load_its_model_exits_without_consuming(tmp_path, redis_url):
    """Its jobs would all fail: it exits at once instead, for a supervisor to restart it."""
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n  - id: tiny-missing\n    source: ./no-such-model-folder\n"
        "    devices: [cpu]\n    context_length: 128\n"
    )
    process = start_worker("tiny-missing", LLMQ_MODELS_FILE=str(models_file))
    try:
        assert process.wait(timeout=120) != 0
    finally:
        stop_worker(process)
    replies = producer().control.inspect(timeout=1).active_queues() or {}
    assert not any(q["name"] == "llmq.tiny-missing.cpu" for qs in replies.values() for q in qs)
