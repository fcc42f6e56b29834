"""Evaluation fixtures: small benchmark files the tests write themselves, in each of the formats
llmq reads, and a real worker of `tiny-evals` (the tiny model with room for GSM8K's 256 new
tokens)."""

import csv
import json
import os
from pathlib import Path

import pytest

from tests.factories import start_worker, stop_worker, wait_for_queue

EVAL_MODEL = "tiny-evals"
EVAL_QUEUE = "llmq.tiny-evals.cpu"
# Where the API reads local benchmark data: <LLMQ_DATA_DIR>/evals.
EVAL_DATA_ROOT = Path(os.environ["LLMQ_DATA_DIR"]) / "evals"

GSM8K_TRAIN = [
    {
        "question": f"Tom has {n} apples and buys {n + 1} more. How many apples has he?",
        "answer": f"He has {n} + {n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1} apples.\n"
        f"#### {2 * n + 1}",
    }
    for n in range(1, 9)
]
GSM8K_TEST = [
    {
        "question": "A box holds 1,200 beads. Ann uses 200. How many are left?",
        "answer": "1,200 - 200 = <<1200-200=1000>>1,000 are left.\n#### 1,000",
    },
    {
        "question": "Lily reads 3 pages a day for 4 days. How many pages?",
        "answer": "3 * 4 = <<3*4=12>>12 pages.\n#### 12",
    },
    {
        "question": "A pen costs $2. How much do 5 pens cost?",
        "answer": "5 * 2 = <<5*2=10>>10 dollars.\n#### 10",
    },
]
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
# (question, choices, answer index); `None` and `0.50` must stay text.
ALGEBRA_DEV = [
    ("What is 2 + 2?", ["3", "4", "5", "6"], 1),
    ("Which is even?", ["1", "3", "8", "9"], 2),
]
ALGEBRA_TEST = [
    ("  Which value is a half?  ", ["0.50", "None", "2", "1/3"], 0),
    ("Pick the empty answer.", ["None", "zero", "nil", "void"], 0),
    ("What is 3 * 3?", ["6", "9", "12", "33"], 1),
]
ANATOMY_DEV = [("Bones of the hand?", ["27", "12", "5", "100"], 0)]
ANATOMY_TEST = [
    ("Where is the femur?", ["arm", "leg", "skull", "hand"], 1),
    ("How many chambers has the heart?", ["1", "2", "3", "4"], 3),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_cais_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MMLU_HEADER)
        for question, choices, answer in rows:
            writer.writerow([question, *choices, answer])


def write_hendrycks_csv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for question, choices, answer in rows:
            writer.writerow([question, *choices, "ABCD"[answer]])


def write_benchmarks(root: Path, mixed_layouts: bool = True) -> Path:
    """gsm8k/ and mmlu/ under `root`, as the API reads them; mmlu mixes both CSV layouts unless
    told not to (lm-eval's CSV tasks read the cais layout only)."""
    write_jsonl(root / "gsm8k" / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(root / "gsm8k" / "test.jsonl", GSM8K_TEST)
    write_cais_csv(root / "mmlu" / "dev" / "abstract_algebra_dev.csv", ALGEBRA_DEV)
    write_cais_csv(root / "mmlu" / "test" / "abstract_algebra_test.csv", ALGEBRA_TEST)
    write_anatomy = write_hendrycks_csv if mixed_layouts else write_cais_csv
    write_anatomy(root / "mmlu" / "dev" / "anatomy_dev.csv", ANATOMY_DEV)
    write_anatomy(root / "mmlu" / "test" / "anatomy_test.csv", ANATOMY_TEST)
    return root


@pytest.fixture(scope="session")
def eval_data() -> Path:
    return write_benchmarks(EVAL_DATA_ROOT)


@pytest.fixture(scope="session")
def eval_worker(database_url, redis_url, tiny_model_path):
    process = start_worker(EVAL_MODEL)
    try:
        wait_for_queue(EVAL_QUEUE, process)
        yield process
    finally:
        stop_worker(process)
