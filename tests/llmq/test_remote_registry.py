"""models.yaml entries of remote models: what they must and may not say, and how the completion
cache and a worker treat their configuration."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from llmq.fingerprint import ModelRevisions
from llmq.registry import ModelSpec
from workers.remote.upstream import UpstreamClient, UpstreamTransient

REMOTE = {
    "id": "far",
    "source": "remote",
    "tokenizer": "builtin:tiny-llama",
    "remote": {"base_url": "http://127.0.0.1:9/v1", "model": "up"},
}


def test_remote_entry_gets_the_remote_queue_and_its_tokenizer_files(tmp_path):
    spec = ModelSpec.model_validate(REMOTE)
    assert spec.is_remote and spec.devices == ["remote"]
    assert spec.queue("remote") == "llmq.far.remote"
    assert spec.local_path(tmp_path) == tmp_path / "models" / "tiny-llama"
    assert spec.worker_threads == spec.remote.max_concurrency == 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"remote": None}, "source: remote needs a `remote:` block"),
        ({"tokenizer": None}, "a remote model needs `tokenizer`"),
        ({"devices": ["cpu"]}, "a remote model's devices are [remote]"),
        ({"source": "builtin:tiny-llama"}, "a `remote:` block needs source: remote"),
        ({"remote": {"base_url": "ftp://x", "model": "up"}}, "should match pattern"),
        ({"remote": {**REMOTE["remote"], "api_key_env": "sk-123 key"}}, "should match pattern"),
    ],
)
def test_remote_entry_mistakes_are_named(change, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelSpec.model_validate(REMOTE | change)


def test_local_model_cannot_take_the_remote_device():
    with pytest.raises(ValidationError, match="device remote is for source: remote models"):
        ModelSpec.model_validate({"id": "near", "source": "x", "devices": ["remote"]})


def test_remote_model_is_cached_only_under_a_revision(tmp_path: Path):
    revisions = ModelRevisions(tmp_path)
    assert revisions.revision(ModelSpec.model_validate(REMOTE)) is None
    pinned = ModelSpec.model_validate(REMOTE | {"id": "pinned", "revision": "2026-11"})
    assert revisions.revision(pinned) == "rev:2026-11"


def test_unset_key_variable_fails_requests_as_an_unreachable_upstream(monkeypatch):
    monkeypatch.delenv("LLMQ_NO_SUCH_KEY", raising=False)
    remote = {**REMOTE["remote"], "api_key_env": "LLMQ_NO_SUCH_KEY"}
    client = UpstreamClient(ModelSpec.model_validate(REMOTE | {"remote": remote}).remote)
    with pytest.raises(UpstreamTransient, match="LLMQ_NO_SUCH_KEY is not set"):
        client.model_names()
    client.close()
