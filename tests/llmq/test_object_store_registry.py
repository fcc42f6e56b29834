"""models.yaml entries whose weights are in an object store: the URLs and storage options they
may give, and the messages for those they may not."""

import pytest
from pydantic import ValidationError

from llmq.registry import ModelSpec, load_registry


def test_object_store_entries_keep_their_urls_and_have_no_local_path(tmp_path):
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        "models:\n"
        "  - id: on-s3\n    source: s3://weights/llama/8b\n"
        "    storage_options: {endpoint_url: 'http://minio.internal:9000'}\n"
        "  - id: on-gcs\n    source: gs://weights/llama\n    storage_options: {token: anon}\n"
        "  - id: far\n    source: remote\n    tokenizer: s3://weights/llama/8b\n"
        "    remote: {base_url: 'http://vllm:8000/v1', model: llama}\n"
    )
    registry = load_registry(models_file)
    on_s3, on_gcs, far = (registry.get(name) for name in ("on-s3", "on-gcs", "far"))

    assert on_s3.source == "s3://weights/llama/8b", "a URL is not a folder beside models.yaml"
    assert on_s3.is_object_store and on_gcs.is_object_store and far.is_object_store
    assert on_s3.local_path(tmp_path) is None
    assert on_s3.storage_options == {"endpoint_url": "http://minio.internal:9000"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"source": "https://example.com/llama"},
            "m: source 'https://example.com/llama': scheme https:// is not supported; "
            "llmq reads s3:// and gs://",
        ),
        (
            {
                "source": "remote",
                "tokenizer": "azure://c/t",
                "remote": {"base_url": "http://u/v1", "model": "u"},
            },
            "m: tokenizer 'azure://c/t': scheme azure:// is not supported",
        ),
        (
            {"source": "s3:///llama"},
            "m: source 's3:///llama' names no bucket: write s3://bucket/prefix",
        ),
        (
            {"source": "models/stories260K", "storage_options": {"anon": True}},
            "m: storage_options is for s3:// and gs:// sources",
        ),
        (
            {"source": "s3://b/m", "storage_options": {"key": "AKIA", "secret": "x"}},
            "m: storage_options may not hold credentials (key, secret): set them in the environ",
        ),
        (
            {
                "source": "s3://b/m",
                "storage_options": {"client_kwargs": {"aws_secret_access_key": "x"}},
            },
            "credentials (client_kwargs.aws_secret_access_key)",
        ),
    ],
)
def test_object_store_entry_mistakes_are_named(entry, message):
    with pytest.raises(ValidationError) as raised:
        ModelSpec.model_validate({"id": "m"} | entry)
    assert message in str(raised.value)
