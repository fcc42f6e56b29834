"""The oracle: lm-evaluation-harness on the same tiny model, data and shots gives the same prompts,
the same answers and the same scores, item for item.

lm-eval is not a dependency of llmq; it lives in its own virtualenv. Point LLMQ_LMEVAL_PYTHON at
that environment's python to run this test (`python -m venv V && V/bin/pip install
"lm-eval[hf]" torch==2.13.0`); `python -m bench.evals` does the same on the full benchmarks.
"""

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.lmeval_tasks import lmeval_run, write_tasks
from llmq.evals import mmlu
from tests.evals.conftest import EVAL_DATA_ROOT, EVAL_MODEL, write_benchmarks
from tests.evals.test_runs import items_of, start_run, wait_for_run

LMEVAL_PYTHON = os.environ.get("LLMQ_LMEVAL_PYTHON")
SHOTS = 1
SUBJECTS = ["abstract_algebra", "anatomy"]
# Both sides read the same files, all in the cais layout (lm-eval's CSV tasks need a header).
DATA = "fidelity"

pytestmark = pytest.mark.skipif(
    not LMEVAL_PYTHON, reason="set LLMQ_LMEVAL_PYTHON to a python that has lm-eval installed"
)


@pytest.fixture(scope="module")
def lmeval_samples(eval_data, tiny_model_path, tmp_path_factory) -> dict:
    """lm-eval's logged samples, keyed by (task, doc id, filter)."""
    out = tmp_path_factory.mktemp("lmeval")
    data = write_benchmarks(EVAL_DATA_ROOT / DATA, mixed_layouts=False)
    tasks = write_tasks(data, out / "tasks")
    names = ["llmq_gsm8k", *(f"llmq_mmlu_{s}" for s in SUBJECTS)]
    command, env = lmeval_run(
        LMEVAL_PYTHON,
        tiny_model_path,
        tasks,
        names,
        num_fewshot=SHOTS,
        batch_size=4,
        output_dir=out / "results",
    )
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=600)
    samples = {}
    for path in glob.glob(str(out / "results" / "*" / "samples_*.jsonl")):
        task = Path(path).name.removeprefix("samples_").rsplit("_", 1)[0]
        task = task.removeprefix("llmq_mmlu_").removeprefix("llmq_")
        for line in Path(path).read_text().split("\n"):
            if not line:
                continue
            sample = json.loads(line)
            samples[(task, sample["doc_id"], sample["filter"])] = sample
    return samples


def test_mmlu_matches_lm_eval_item_for_item(client, eval_worker, lmeval_samples):
    body = {"benchmark": "mmlu", "model": EVAL_MODEL, "num_fewshot": SHOTS, "subjects": SUBJECTS}
    body["dataset"] = f"{DATA}/mmlu"
    items = items_of(client, wait_for_run(client, start_run(client, body)["id"])["id"])
    assert len(items) == 5
    for item in items:
        sample = lmeval_samples[(item["task"], item["doc_index"], "none")]
        assert item["prompt"] == sample["arguments"]["gen_args_0"]["arg_0"]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert item["answer"]["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        assert item["answer"]["prediction"] == mmlu.predict(theirs)
        assert item["metrics"]["acc"] == sample["acc"]


def test_gsm8k_matches_lm_eval_item_for_item(client, eval_worker, lmeval_samples):
    body = {"benchmark": "gsm8k", "model": EVAL_MODEL, "num_fewshot": SHOTS}
    body["dataset"] = f"{DATA}/gsm8k"
    items = items_of(client, wait_for_run(client, start_run(client, body)["id"])["id"])
    assert len(items) == 3
    for item in items:
        for name in ("strict-match", "flexible-extract"):
            sample = lmeval_samples[("gsm8k", item["doc_index"], name)]
            assert item["prompt"] == sample["arguments"]["gen_args_0"]["arg_0"]
            # Postgres text holds no NUL: llmq shows it as ␀ (README, design decisions).
            assert item["output"] == sample["resps"][0][0].replace("\x00", "\u2400")
            assert item["answer"][name] == sample["filtered_resps"][0]
            assert item["metrics"][f"exact_match,{name}"] == sample["exact_match"]
