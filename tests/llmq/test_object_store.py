"""Object-store models are downloaded once per host, verified, and never used half-written:
against a real S3 server (moto, a subprocess) behind a proxy that counts and breaks requests."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from llmq.model_copies import MANIFEST, cache_dir, local_copy
from llmq.object_store import (
    ATTEMPTS,
    ChecksumMismatch,
    NoObjects,
    ObjectStoreFolder,
    UnsafeObjectName,
    store_revision,
)
from tests.conftest import STORIES
from tests.s3_server import Fault, s3_client, upload_folder

MODEL_FILES = sorted(p.name for p in STORIES.iterdir() if p.is_file())
# One download in a process of its own: the URL, the data directory, the storage options.
FETCH = (
    "import json, sys; from pathlib import Path; from llmq.model_copies import local_copy; "
    "print(local_copy(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])), flush=True)"
)


def fetch_process(url: str, data_dir, options: dict, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FETCH, url, str(data_dir), json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | env,
    )


def through(proxy, **options) -> dict:
    return {"endpoint_url": proxy.endpoint, **options}


# botocore checks S3's CRC of what it receives too: without it, the checks seen are llmq's.
UNCHECKED = {"config_kwargs": {"response_checksum_validation": "when_required"}}


def copies_of(url: str, options: dict, data_dir):
    return cache_dir(ObjectStoreFolder(url, options), data_dir)


def entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_each_object_once_then_reuses_the_copy(s3_model, s3_proxy, tmp_path):
    first = local_copy(s3_model, tmp_path, through(s3_proxy))
    again = local_copy(s3_model, tmp_path, through(s3_proxy))

    assert again == first
    assert first.parent == copies_of(s3_model, through(s3_proxy), tmp_path)
    assert entries(first) == sorted([*MODEL_FILES, MANIFEST])
    assert {name: s3_proxy.gets(name) for name in MODEL_FILES} == dict.fromkeys(MODEL_FILES, 1)
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["url"] == s3_model
    for entry in manifest["files"]:
        content = (STORIES / entry["name"]).read_bytes()
        assert (first / entry["name"]).read_bytes() == content
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    assert entries(first.parent) == [".lock", first.name], "no partial download is left"


def test_two_processes_on_one_host_download_the_model_once(s3_model, s3_proxy, tmp_path):
    """The second waits on the first's lock, then uses its copy. The endpoint comes from
    AWS_ENDPOINT_URL, as an operator would set it."""
    # The weights come slowly, so that the second asks while the first still downloads.
    s3_proxy.faults.append(Fault("GET", "model.safetensors", "delay", seconds=3))
    processes = [
        fetch_process(s3_model, tmp_path, {}, AWS_ENDPOINT_URL=s3_proxy.endpoint) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    assert len({output.strip().splitlines()[-1] for output in outputs}) == 1, outputs
    assert {name: s3_proxy.gets(name) for name in MODEL_FILES} == dict.fromkeys(MODEL_FILES, 1)
    waited = [output for output in outputs if "waiting for another process's download" in output]
    assert len(waited) == 1, outputs
    assert "using another process's download" in waited[0]


def test_a_download_killed_midway_leaves_nothing_complete(s3_model, s3_proxy, tmp_path):
    s3_proxy.faults.append(Fault("GET", "model.safetensors", "stall"))
    process = fetch_process(s3_model, tmp_path, through(s3_proxy))
    try:
        assert s3_proxy.stalled.wait(60), "the download never reached the weights"
        time.sleep(0.3)  # half of the weights written
    finally:
        process.kill()
        process.wait()
    copies = copies_of(s3_model, through(s3_proxy), tmp_path)
    left = entries(copies)
    assert [name for name in left if not name.startswith(".")] == [], "no copy passes as complete"
    assert any(name.startswith(".partial-") for name in left), left

    path = local_copy(s3_model, tmp_path, through(s3_proxy))

    assert s3_proxy.gets("model.safetensors") == 2
    assert (path / "model.safetensors").read_bytes() == (STORIES / "model.safetensors").read_bytes()
    assert entries(copies) == [".lock", path.name], "the dead download's folder is removed"


def test_an_object_that_arrives_corrupted_is_downloaded_again(s3_model, s3_proxy, tmp_path):
    s3_proxy.faults.append(Fault("GET", "model.safetensors", "corrupt"))

    path = local_copy(s3_model, tmp_path, through(s3_proxy, **UNCHECKED))

    assert s3_proxy.gets("model.safetensors") == 2
    assert (path / "model.safetensors").read_bytes() == (STORIES / "model.safetensors").read_bytes()


def test_an_object_that_always_arrives_corrupted_fails_and_leaves_no_copy(
    s3_model, s3_proxy, tmp_path
):
    s3_proxy.faults.append(Fault("GET", "tokenizer.json", "corrupt", times=ATTEMPTS))

    with pytest.raises(ChecksumMismatch, match=r"tokenizer.json: downloaded MD5 [0-9a-f]{32}; the"):
        local_copy(s3_model, tmp_path, through(s3_proxy, **UNCHECKED))

    assert s3_proxy.gets("tokenizer.json") == ATTEMPTS
    copies = copies_of(s3_model, through(s3_proxy, **UNCHECKED), tmp_path)
    assert [name for name in entries(copies) if not name.startswith(".")] == []


def test_transient_failures_are_retried(s3_model, s3_proxy, tmp_path):
    # botocore would retry a 503 itself: with one attempt each, the retries seen are llmq's.
    options = through(s3_proxy, config_kwargs={"retries": {"max_attempts": 1}})
    s3_proxy.faults += [
        Fault("GET", "list", "fail", times=1),
        Fault("GET", "config.json", "fail", times=2),
    ]

    path = local_copy(s3_model, tmp_path, options)

    assert s3_proxy.gets("config.json") == 3
    assert (path / "config.json").read_bytes() == (STORIES / "config.json").read_bytes()


def test_a_copy_changed_on_disk_is_downloaded_again(s3_model, s3_proxy, tmp_path):
    path = local_copy(s3_model, tmp_path, through(s3_proxy))
    touched = path / "config.json"
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    assert local_copy(s3_model, tmp_path, through(s3_proxy)) == path
    assert s3_proxy.gets("config.json") == 1, "a file touched but unchanged is kept"

    changed = path / "tokenizer_config.json"
    content = changed.read_bytes()
    changed.write_bytes(content.replace(b"<s>", b"<x>"))  # same size, other bytes

    assert local_copy(s3_model, tmp_path, through(s3_proxy)) == path
    assert changed.read_bytes() == content
    assert {name: s3_proxy.gets(name) for name in MODEL_FILES} == dict.fromkeys(MODEL_FILES, 2)


def test_new_objects_land_in_a_new_copy_with_a_new_revision(s3_model, s3_endpoint, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    old_path = local_copy(s3_model, tmp_path, options)
    old_revision = store_revision(s3_model, options)
    bucket = s3_model.removeprefix("s3://").split("/")[0]
    config = json.loads((STORIES / "config.json").read_text()) | {"rms_norm_eps": 1e-6}
    s3_client(s3_endpoint).put_object(
        Bucket=bucket, Key="stories260K/config.json", Body=json.dumps(config).encode()
    )

    new_path = local_copy(s3_model, tmp_path, options)

    assert new_path != old_path and old_path.exists()
    assert json.loads((new_path / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert old_revision.startswith("objects:")
    assert store_revision(s3_model, options) not in (None, old_revision)


def test_hidden_objects_are_not_part_of_the_model(s3_model, s3_endpoint, tmp_path):
    bucket = s3_model.removeprefix("s3://").split("/")[0]
    s3_client(s3_endpoint).put_object(
        Bucket=bucket, Key="stories260K/.cache/huggingface/download.lock", Body=b""
    )

    path = local_copy(s3_model, tmp_path, {"endpoint_url": s3_endpoint})

    assert entries(path) == sorted([*MODEL_FILES, MANIFEST])


def test_an_object_named_outside_the_folder_is_refused(s3_endpoint, tmp_path):
    bucket = "models-unsafe-names"
    upload_folder(s3_endpoint, bucket, "m", STORIES)
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="m/../../escape.txt", Body=b"x")

    with pytest.raises(UnsafeObjectName, match=r"'\.\./\.\./escape\.txt' would be written outside"):
        local_copy(f"s3://{bucket}/m", tmp_path / "data", {"endpoint_url": s3_endpoint})

    assert not (tmp_path / "escape.txt").exists()


def test_an_empty_prefix_or_missing_bucket_says_so(s3_model, s3_endpoint, tmp_path):
    options = {"endpoint_url": s3_endpoint}
    bucket = s3_model.removeprefix("s3://").split("/")[0]
    with pytest.raises(NoObjects, match=rf"s3://{bucket}/nothing: no objects under this URL"):
        local_copy(f"s3://{bucket}/nothing", tmp_path, options)
    with pytest.raises(NoObjects, match="s3://no-such-bucket/m: The specified bucket does not"):
        local_copy("s3://no-such-bucket/m", tmp_path, options)
    assert store_revision("s3://no-such-bucket/m", options) is None


def test_a_missing_backend_names_the_extra_to_install(tmp_path):
    script = (
        "import sys; from pathlib import Path; sys.modules['s3fs'] = None; "
        "from llmq.model_copies import local_copy; local_copy('s3://b/m', Path(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    assert "ObjectStoreExtraMissing: reading s3://b/m needs the s3fs package: " in result.stderr
    assert "pip install 'llmq[objectstore]'" in result.stderr
