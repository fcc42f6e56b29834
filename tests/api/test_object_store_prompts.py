"""The API counts prompts and renders chats for an object-store model from its tokenizer files
alone, fetched once, without torch."""

import json
import subprocess
import sys

import pytest

from api.intake.prompts import PromptCounter
from llmq.errors import ServiceUnavailable
from llmq.registry import ModelSpec
from tests.conftest import ROOT, STORIES

PROMPT = "Once upon a time there was a little girl"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
# The API's work, in a process of its own to show what it imports.
COUNT = """
import json, sys
from pathlib import Path
from api.intake.prompts import PromptCounter
from llmq.registry import ModelSpec

url, endpoint, data_dir, prompt, messages = sys.argv[1:]
spec = ModelSpec(id="stories-s3", source=url, storage_options={"endpoint_url": endpoint})
counter = PromptCounter(Path(data_dir))
print(json.dumps({
    "count": counter.count(spec, prompt),
    "chat": counter.render_chat(spec, json.loads(messages)),
    "eos": counter.eos_text(spec),
    "imported": sorted({"torch", "transformers"} & sys.modules.keys()),
}))
"""


def test_the_api_counts_an_s3_models_prompts_without_torch_or_weights(s3_model, s3_proxy, tmp_path):
    args = [s3_model, s3_proxy.endpoint, str(tmp_path), PROMPT, json.dumps(MESSAGES)]
    result = subprocess.run(
        [sys.executable, "-c", COUNT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])

    local = ModelSpec(id="stories260K", source=str(STORIES))
    counter = PromptCounter(tmp_path)
    assert answer["count"] == counter.count(local, PROMPT) == 12
    assert answer["chat"] == counter.render_chat(local, MESSAGES)
    assert answer["eos"] == "</s>"
    assert answer["imported"] == []
    fetched = {name: s3_proxy.gets(name) for name in ("tokenizer.json", "tokenizer_config.json")}
    assert fetched == {"tokenizer.json": 1, "tokenizer_config.json": 1}
    assert s3_proxy.gets("model.safetensors") == 0, "the weights stay in the store"


def test_a_model_whose_store_cannot_give_its_tokenizer_is_unavailable(s3_endpoint, tmp_path):
    spec = ModelSpec(
        id="stories-gone",
        source="s3://no-such-bucket/m",
        storage_options={"endpoint_url": s3_endpoint},
    )

    with pytest.raises(ServiceUnavailable) as raised:
        PromptCounter(tmp_path).count(spec, PROMPT)

    assert raised.value.status_code == 503
    assert raised.value.message.startswith(
        "stories-gone's tokenizer files cannot be read from s3://no-such-bucket/m now: "
    )
