"""Completion-cache fingerprints: every change that can change the text changes the key, and
nothing else does."""

import os
import time

import pytest

from llmq.constraints import OutputConstraint
from llmq.fingerprint import (
    ModelRevisions,
    fingerprint,
    folder_revision,
    is_deterministic,
    output_shaping_params,
)
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec
from tests.factories import free_port

SPEC = ModelSpec(id="tiny", source="builtin:tiny-llama")
QUEUE = "llmq.tiny.cpu"
SEEDED = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=3)


def key(params: SamplingParams = SEEDED, prompt: str = "Once", **identity) -> str:
    identity = {"spec": SPEC, "revision": "files:abc", "queue": QUEUE} | identity
    return fingerprint(prompt=prompt, params=params, **identity).cache_key


# Another value for every SamplingParams field; a new field fails the test until it is listed.
CHANGES = {
    "max_tokens": 17,
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 41,
    "seed": 4,
    "stop": ["."],
    "ignore_eos": True,
    "min_tokens": 2,
    "truncate_prompt_tokens": 64,
    "min_p": 0.1,
    "stop_token_ids": [5],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": {5: 1.0},
    "logprobs": 2,
    "prompt_logprobs": 2,
    "constraint": OutputConstraint(kind="regex", value="[0-9]+"),
}


def test_every_sampling_parameter_is_listed():
    assert set(CHANGES) == set(SamplingParams.model_fields)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_changing_any_parameter_of_a_seeded_request_changes_the_key(field):
    assert key(SEEDED.model_copy(update={field: CHANGES[field]})) != key()


def test_stop_strings_count_in_order_and_content():
    one = SEEDED.model_copy(update={"stop": ["a", "b"]})
    assert key(one) != key(SEEDED.model_copy(update={"stop": ["a"]}))
    assert key(one) == key(SEEDED.model_copy(update={"stop": ["a", "b"]}))


def test_prompt_model_revision_and_device_change_the_key():
    assert key(prompt="Once ") != key()
    assert key(spec=ModelSpec(id="other", source="builtin:tiny-llama")) != key()
    assert key(revision="files:def") != key()
    assert key(queue="llmq.tiny.cuda") != key()


def test_greedy_request_ignores_what_greedy_decoding_does_not_use():
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    unused = greedy.model_copy(update={"seed": 9, "top_p": 0.5, "top_k": 3})
    assert key(unused) == key(greedy)
    assert "seed" not in output_shaping_params(greedy)
    assert key(greedy.model_copy(update={"stop": ["x"]})) != key(greedy)


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert is_deterministic(SamplingParams(max_tokens=4, temperature=0.0))
    assert is_deterministic(SamplingParams(max_tokens=4, temperature=1.0, seed=0))
    assert not is_deterministic(SamplingParams(max_tokens=4, temperature=1.0))


def test_folder_revision_follows_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = folder_revision(tmp_path)

    assert folder_revision(tmp_path) == first
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("")
    assert folder_revision(tmp_path) == first, "hidden download state is not the model"
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    stat = (tmp_path / "model.safetensors").stat()
    os.utime(tmp_path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert folder_revision(tmp_path) != first
    assert folder_revision(tmp_path / "missing") is None


def test_revision_in_models_yaml_names_the_weights(tmp_path):
    local = ModelSpec(id="local", source=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    revisions = ModelRevisions(tmp_path, refresh_s=0)

    assert revisions.revision(local).startswith("files:")
    assert revisions.revision(local.model_copy(update={"revision": "v2"})) == "rev:v2"


def test_hub_model_never_downloaded_has_no_revision(tmp_path):
    hub = ModelSpec(id="hub", source="nobody/never-downloaded")
    assert ModelRevisions(tmp_path, refresh_s=0).revision(hub) is None


def test_object_store_model_revision_follows_its_objects(s3_model, s3_endpoint, tmp_path):
    from tests.s3_server import s3_client

    stored = ModelSpec(id="s3", source=s3_model, storage_options={"endpoint_url": s3_endpoint})
    revisions = ModelRevisions(tmp_path, refresh_s=0, store_wait_s=30)
    first = revisions.revision(stored)
    assert first.startswith("objects:") and revisions.revision(stored) == first

    bucket = s3_model.removeprefix("s3://").split("/")[0]
    s3_client(s3_endpoint).put_object(
        Bucket=bucket, Key="stories260K/model.safetensors", Body=b"other weights"
    )
    assert revisions.revision(stored) not in (None, first)
    assert revisions.revision(stored.model_copy(update={"revision": "v2"})) == "rev:v2"


def test_an_object_store_out_of_reach_holds_up_a_request_briefly(tmp_path):
    away = {"endpoint_url": f"http://127.0.0.1:{free_port()}"}
    stored = ModelSpec(id="s3-away", source="s3://weights/m", storage_options=away)
    revisions = ModelRevisions(tmp_path, refresh_s=0, store_wait_s=0.5)

    started = time.monotonic()
    assert revisions.revision(stored) is None, "not cached: its weights cannot be told"
    assert time.monotonic() - started < 2
