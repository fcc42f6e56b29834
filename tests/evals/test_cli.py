"""`llmq eval` against the real API server: progress, the scores table, the JSON and PNG."""

import json
import subprocess
import sys

from tests.evals.conftest import EVAL_MODEL
from tests.factories import ROOT


def test_llmq_eval_prints_scores_and_writes_json_and_png(
    api_server, eval_worker, eval_data, tmp_path
):
    command = [
        sys.executable, "-m", "llmq.cli", "eval", "mmlu",
        "--model", EVAL_MODEL,
        "--num-fewshot", "1",
        "--subjects", "abstract_algebra,anatomy",
        "--api", api_server,
        "--output", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mmlu · tiny-evals · 1-shot" in done.stdout
    reports = sorted(tmp_path.iterdir())
    assert [p.suffix for p in reports] == [".json", ".png"]
    report = json.loads(reports[0].read_text())
    assert report["status"] == "succeeded"
    assert report["scores"]["metrics"]["acc"]["n"] == 5
    assert f"{report['scores']['metrics']['acc']['value']:.4f}" in done.stdout
    assert reports[1].read_bytes().startswith(b"\x89PNG")


def test_llmq_eval_with_an_unknown_model_says_so(api_server, tmp_path):
    command = [sys.executable, "-m", "llmq.cli", "eval", "gsm8k", "--model", "nope",
               "--api", api_server, "--output", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "model 'nope' is not served here" in done.stdout
