"""Benchmark data as plain records, from a folder inside the evaluation data directory or from
the Hugging Face dataset hub.

Where a run may read its data (`resolve_dataset`). The API calls it when a run is created, and
the driver again when the run is planned, so a run stored before a rule existed is held to it:

- a folder inside the evaluation data directory (`LLMQ_EVAL_DATA_DIR`), named by its path
  relative to it (`gsm8k`, `mine/mmlu-v2`). Each part of the name is ASCII letters, digits, `.`,
  `_` and `-`, not starting with `.`, so `..`, absolute paths, backslashes, `%`-escapes, NUL and
  look-alike Unicode never reach the file system. The folder and every file read from it must
  lie inside the directory once links are resolved: a link that leads out of it is refused;
- the benchmark's own hub dataset (`openai/gsm8k`, `cais/mmlu`) and no other: the `datasets`
  package reads a folder of that name relative to the working directory before it asks the hub,
  and a hub repository's loading script is code.

Errors name files by their path inside the data directory, never by where it lies on the server.

Local layouts:

- GSM8K: `train.jsonl` and `test.jsonl`, one JSON object per line with `question` and `answer`
  (the worked solution ending in `#### <number>`), as in openai/grade-school-math.
- MMLU: `dev/<subject>_dev.csv` and `test/<subject>_test.csv`, in either of two layouts, told
  apart by the first row of each file:
  - cais/mmlu flattened to CSV: header `question,choice0,choice1,choice2,choice3,answer`, the
    answer a 0-based index;
  - the original Hendrycks `data.tar`: no header, columns question, A, B, C, D, answer letter.

Every cell is read as the text it is: a choice written `None` stays the string "None" and
`0.50` stays "0.50" (pandas would turn them into a null and 0.5, and the prompts would change).

Hub ids need the optional `datasets` package (`pip install 'llmq[hub]'`) and a reachable hub.
"""

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from llmq.errors import InvalidRequest

log = structlog.get_logger(__name__)

GSM8K_HUB_ID = "openai/gsm8k"
MMLU_HUB_ID = "cais/mmlu"
HUB_IDS = {"gsm8k": GSM8K_HUB_ID, "mmlu": MMLU_HUB_ID}
GSM8K_FILES = ("train.jsonl", "test.jsonl")
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
LETTERS = "ABCD"
MAX_NAME_CHARS = 200  # said in resolve_dataset's message
# One part of a folder or file name: no separator, no `.` or `..`, nothing hidden or escaped.
NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# A missing-files message lists this many and counts the rest (all of MMLU is 114 files).
MAX_LISTED = 6


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


@dataclass(frozen=True)
class LocalDataset:
    """A folder inside the evaluation data directory."""

    root: Path  # the data directory, links resolved
    name: str  # the folder's path relative to it: what a run stores and shows

    def files(self, relatives: Iterable[str], what: str) -> list[tuple[Path, str]]:
        """(real path, name shown in errors) of each file; refused when one is missing or a
        link leads it out of the data directory."""
        found, missing = [], []
        for relative in relatives:
            shown = f"{self.name}/{relative}"
            path = _real(self.root / self.name / relative) if _is_relative_name(relative) else None
            if path is not None and not path.is_relative_to(self.root):
                raise DatasetUnavailable(
                    f"{what} file {shown} leads outside the evaluation data directory through "
                    "a link; copy the data into that directory instead",
                    param="dataset",
                )
            if path is None or not path.is_file():
                missing.append(shown)
            else:
                found.append((path, shown))
        if missing:
            listed = ", ".join(missing[:MAX_LISTED])
            more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
            raise DatasetUnavailable(
                f"{what} files not found in the evaluation data directory: {listed}{more}",
                param="dataset",
            )
        return found


@dataclass(frozen=True)
class HubDataset:
    """The benchmark's dataset on the Hugging Face hub."""

    name: str  # its hub id


DatasetSource = LocalDataset | HubDataset


def mmlu_files(subject: str) -> tuple[str, str]:
    """A subject's dev and test files, relative to its dataset's folder."""
    return f"dev/{subject}_dev.csv", f"test/{subject}_test.csv"


def resolve_dataset(benchmark: str, requested: str | None, root: Path) -> DatasetSource:
    """Where a run of `benchmark` reads its data: a folder strictly inside `root` (links
    resolved), or the benchmark's hub dataset. Unset: the folder named after the benchmark if
    there is one, else the hub."""
    hub_id = HUB_IDS[benchmark]
    name = benchmark if requested is None else requested
    if not _is_relative_name(name):
        raise DatasetUnavailable(
            f"dataset {name!r} is not a folder name: give the folder's path inside the "
            "evaluation data directory, at most 200 characters, each part made of letters, "
            "digits, '.', '_' and '-' and not starting with '.' (such as "
            f"{benchmark} or mine/{benchmark}), or {hub_id}",
            param="dataset",
        )
    base = _real(root)
    folder = _real(base / name) if base is not None else None
    if base is not None and folder is not None:
        if not folder.is_relative_to(base):
            raise DatasetUnavailable(
                f"dataset {name!r} leads outside the evaluation data directory through a link; "
                "copy the data into that directory instead",
                param="dataset",
            )
        if folder.is_dir():
            return LocalDataset(base, name)
    if requested is None or name == hub_id:
        return HubDataset(hub_id)
    raise DatasetUnavailable(
        f"dataset {name!r} is not a folder in the evaluation data directory, nor {hub_id}; "
        f"name a folder there (such as {benchmark}) or {hub_id}",
        param="dataset",
    )


def read_jsonl(path: Path, shown: str | None = None) -> list[MathProblem]:
    """GSM8K records; errors name the file as `shown` (its path inside the data directory)."""
    shown = shown or path.name
    problems = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    problems.append(MathProblem(str(row["question"]), str(row["answer"])))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DatasetUnavailable(
                        f"{shown}:{number} is not a GSM8K record with 'question' and 'answer': "
                        f"{exc}"
                    ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetUnavailable(f"{shown} cannot be read: {_reason(exc)}") from exc
    return problems


def read_mmlu_csv(path: Path, shown: str | None = None) -> list[Question]:
    """Either layout; the header row, when there is one, names the cais/mmlu columns."""
    shown = shown or path.name
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetUnavailable(f"{shown} cannot be read: {_reason(exc)}") from exc
    has_header = bool(rows) and rows[0] == MMLU_HEADER
    questions = []
    for number, row in enumerate(rows[1:] if has_header else rows, 2 if has_header else 1):
        if len(row) != 6:
            raise DatasetUnavailable(f"{shown}: row {number} has {len(row)} cells, not 6")
        answer = row[5].strip()
        try:
            index = int(answer) if has_header else LETTERS.index(answer)
        except ValueError:
            index = -1
        if not 0 <= index < 4 or (not has_header and len(answer) != 1):
            expected = "an index 0-3" if has_header else "a letter A-D"
            raise DatasetUnavailable(f"{shown}: row {number} answer {answer!r} is not {expected}")
        questions.append(Question(row[0], tuple(row[1:5]), index))
    return questions


def load_gsm8k(source: DatasetSource) -> Gsm8kData:
    if isinstance(source, LocalDataset):
        train, test = (
            read_jsonl(path, shown) for path, shown in source.files(GSM8K_FILES, "GSM8K")
        )
        return Gsm8kData(train, test)
    splits = _hub_splits(source.name, "main")
    return Gsm8kData(
        [MathProblem(r["question"], r["answer"]) for r in splits["train"]],
        [MathProblem(r["question"], r["answer"]) for r in splits["test"]],
    )


def load_mmlu_subject(source: DatasetSource, subject: str) -> MmluSubject:
    if isinstance(source, LocalDataset):
        dev, test = (
            read_mmlu_csv(path, shown) for path, shown in source.files(mmlu_files(subject), "MMLU")
        )
        return MmluSubject(dev, test)
    splits = _hub_splits(source.name, subject)

    def question(row) -> Question:
        return Question(row["question"], tuple(row["choices"]), int(row["answer"]))

    return MmluSubject([question(r) for r in splits["dev"]], [question(r) for r in splits["test"]])


def _hub_splits(dataset_id: str, config: str):
    try:
        import datasets  # optional: only hub ids need it
    except ImportError as exc:
        raise DatasetUnavailable(
            f"{dataset_id!r} is not a folder in the evaluation data directory, and reading it "
            "from the dataset hub needs the 'datasets' package: pip install 'llmq[hub]'",
            param="dataset",
        ) from exc
    try:
        return datasets.load_dataset(dataset_id, config)
    except Exception as exc:
        # The hub's messages can name the server's cache folders: the log keeps them.
        log.warning("dataset hub load failed", dataset=dataset_id, config=config, error=str(exc))
        raise DatasetUnavailable(
            f"could not load {dataset_id!r} (config {config!r}) from the dataset hub "
            f"({type(exc).__name__}); check that the hub is reachable, or put the data in the "
            "evaluation data directory",
            param="dataset",
        ) from exc


def _is_relative_name(name: str) -> bool:
    return len(name) <= MAX_NAME_CHARS and all(NAME_PART.fullmatch(p) for p in name.split("/"))


def _real(path: Path) -> Path | None:
    """The path with every link resolved, or None when nothing the server may read lies there
    (nothing at all, a loop of links, a folder it may not enter)."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def _reason(exc: Exception) -> str:
    """What went wrong, without the file name an OSError carries (a path on the server)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)
