"""Benchmark data as plain records, from local files or the Hugging Face dataset hub.

Local layouts (`dataset` names a folder):

- GSM8K: `train.jsonl` and `test.jsonl`, one JSON object per line with `question` and `answer`
  (the worked solution ending in `#### <number>`), as in openai/grade-school-math.
- MMLU: `dev/<subject>_dev.csv` and `test/<subject>_test.csv`, in either of two layouts, told
  apart by the first row of each file:
  - cais/mmlu flattened to CSV: header `question,choice0,choice1,choice2,choice3,answer`, the
    answer a 0-based index;
  - the original Hendrycks `data.tar`: no header, columns question, A, B, C, D, answer letter.

Every cell is read as the text it is: a choice written `None` stays the string "None" and
`0.50` stays "0.50" (pandas would turn them into a null and 0.5, and the prompts would change).

Hub ids (`openai/gsm8k` config `main`, `cais/mmlu` config per subject) need the optional
`datasets` package (`pip install 'llmq[hub]'`) and a reachable hub.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from llmq.errors import InvalidRequest

GSM8K_HUB_ID = "openai/gsm8k"
MMLU_HUB_ID = "cais/mmlu"
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
LETTERS = "ABCD"


class DatasetUnavailable(InvalidRequest):
    """The benchmark data cannot be read from where the run asked for it."""


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # the reference solution, ending in "#### <number>"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


@dataclass(frozen=True)
class Gsm8kData:
    train: list[MathProblem]  # the few-shot pool
    test: list[MathProblem]


@dataclass(frozen=True)
class MmluSubject:
    dev: list[Question]  # the few-shot examples, used in order
    test: list[Question]


def read_jsonl(path: Path) -> list[MathProblem]:
    problems = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(MathProblem(str(row["question"]), str(row["answer"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetUnavailable(
                    f"{path}:{number} is not a GSM8K record with 'question' and 'answer': {exc}"
                ) from exc
    return problems


def read_mmlu_csv(path: Path) -> list[Question]:
    """Either layout; the header row, when there is one, names the cais/mmlu columns."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    has_header = bool(rows) and rows[0] == MMLU_HEADER
    questions = []
    for number, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
        if len(row) != 6:
            raise DatasetUnavailable(f"{path}: row {number} has {len(row)} cells, not 6")
        answer = row[5].strip()
        try:
            index = int(answer) if has_header else LETTERS.index(answer)
        except ValueError:
            index = -1
        if not 0 <= index < 4 or (not has_header and len(answer) != 1):
            expected = "an index 0-3" if has_header else "a letter A-D"
            raise DatasetUnavailable(f"{path}: row {number} answer {answer!r} is not {expected}")
        questions.append(Question(row[0], tuple(row[1:5]), index))
    return questions


def load_gsm8k(source: str) -> Gsm8kData:
    folder = Path(source)
    if folder.is_dir():
        files = [folder / "train.jsonl", folder / "test.jsonl"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetUnavailable(f"GSM8K files not found: {', '.join(missing)}")
        return Gsm8kData(read_jsonl(files[0]), read_jsonl(files[1]))
    splits = _hub_splits(source, "main")
    return Gsm8kData(
        [MathProblem(r["question"], r["answer"]) for r in splits["train"]],
        [MathProblem(r["question"], r["answer"]) for r in splits["test"]],
    )


def load_mmlu_subject(source: str, subject: str) -> MmluSubject:
    folder = Path(source)
    if folder.is_dir():
        files = [folder / "dev" / f"{subject}_dev.csv", folder / "test" / f"{subject}_test.csv"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DatasetUnavailable(f"MMLU files not found: {', '.join(missing)}")
        return MmluSubject(read_mmlu_csv(files[0]), read_mmlu_csv(files[1]))
    splits = _hub_splits(source, subject)

    def question(row) -> Question:
        return Question(row["question"], tuple(row["choices"]), int(row["answer"]))

    return MmluSubject([question(r) for r in splits["dev"]], [question(r) for r in splits["test"]])


def _hub_splits(dataset_id: str, config: str):
    try:
        import datasets  # optional: only hub ids need it
    except ImportError as exc:
        raise DatasetUnavailable(
            f"{dataset_id!r} is not a local folder, and reading it from the dataset hub needs "
            "the 'datasets' package: pip install 'llmq[hub]'",
            param="dataset",
        ) from exc
    try:
        return datasets.load_dataset(dataset_id, config)
    except Exception as exc:
        raise DatasetUnavailable(
            f"could not load {dataset_id!r} (config {config!r}) from the dataset hub: {exc}",
            param="dataset",
        ) from exc
