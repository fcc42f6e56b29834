"""`llmq worker` sets the thread settings a worker runs best with, before torch loads, and
keeps any the operator gave."""

import json
import os
import subprocess
import sys

import pytest

from tests.factories import ROOT

# Runs the real command with a model it does not serve: it stops with a usage error after the
# settings are made, and before Celery starts.
PROBE = """
import json, os, sys
from llmq.cli import app
torch_loaded = "torch" in sys.modules  # the command's first lines run before it imports torch
try:
    app(["worker", "--model", "no-such-model"])
except SystemExit as stop:
    code = stop.code
print(json.dumps({
    "code": code,
    "torch_loaded": torch_loaded,
    "spin": os.environ.get("GOMP_SPINCOUNT"),
    "tokenizers": os.environ.get("TOKENIZERS_PARALLELISM"),
}))
"""


def run_probe(**given: str) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "TOKENIZERS_PARALLELISM")
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env | given,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_sets_short_openmp_spin_and_serial_detokenization_before_torch_loads():
    seen = run_probe()
    assert seen["code"] == 2  # the unknown model is a usage error
    assert seen["torch_loaded"] is False  # libgomp reads its settings when torch loads it
    assert seen["spin"] == "1000"
    assert seen["tokenizers"] == "false"


@pytest.mark.parametrize("spin", ["0", "300000"])
def test_worker_keeps_the_operators_thread_settings(spin):
    seen = run_probe(GOMP_SPINCOUNT=spin, TOKENIZERS_PARALLELISM="true")
    assert seen["spin"] == spin
    assert seen["tokenizers"] == "true"
