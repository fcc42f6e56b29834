"""The engine tests' model: the tiny model loaded in this process, once per test module."""

import pytest


@pytest.fixture(scope="module")
def host(tiny_model_path):
    from llmq.registry import ModelSpec
    from workers.host import ModelHost

    spec = ModelSpec(id="tiny-llama", source=str(tiny_model_path), context_length=128)
    return ModelHost.load(spec, "cpu", tiny_model_path.parent)
