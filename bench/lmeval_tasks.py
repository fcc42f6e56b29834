"""lm-evaluation-harness task files for local data: the oracle llmq's evaluation runs must match.

lm-eval's stock `gsm8k` and `mmlu` tasks load their data from the dataset hub. These YAMLs copy
the stock tasks' fields (lm-eval 0.4.x: `tasks/gsm8k/gsm8k.yaml`, `tasks/mmlu/default/`) and
change only the data source to local files, read with every CSV cell kept as text. Task names
get an `llmq_` prefix so they never shadow the stock ones.
"""

import json
import os
from pathlib import Path

from llmq.evals.mmlu import SUBJECT_CATEGORIES

# pandas converters that keep each CSV cell exactly as written (`None`, `0.50`), as llmq does;
# the answer index becomes an int, as in cais/mmlu.
CONVERTERS_MODULE = """
def as_text(value):
    return value


def as_index(value):
    return int(value)
"""

GSM8K_TASK = {
    "task": "llmq_gsm8k",
    "dataset_path": "json",
    "dataset_name": None,
    "output_type": "generate_until",
    "training_split": "train",
    "fewshot_split": "train",
    "test_split": "test",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{answer}}",
    "metric_list": [
        {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "ignore_case": True,
            "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }
    ],
    "generation_kwargs": {
        "until": ["Question:", "</s>", "<|im_end|>"],
        "do_sample": False,
        "temperature": 0.0,
    },
    "repeats": 1,
    "num_fewshot": 5,
    "filter_list": [
        {
            "name": "strict-match",
            "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                {"function": "take_first"},
            ],
        },
        {
            "name": "flexible-extract",
            "filter": [
                {
                    "function": "regex",
                    "group_select": -1,
                    "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)",
                },
                {"function": "take_first"},
            ],
        },
    ],
    "metadata": {"version": 3.0},
}

MMLU_TEMPLATE = {
    "dataset_path": "csv",
    "test_split": "test",
    "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\n"
    "D. {{choice3}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}
TEXT_COLUMNS = ["question", "choice0", "choice1", "choice2", "choice3"]


def _yaml(data: dict, converters: dict[str, str] | None = None) -> str:
    """JSON is YAML; the `!function` tags lm-eval resolves are spliced in as plain text."""
    text = json.dumps(data, indent=2)
    for column, function in (converters or {}).items():
        text = text.replace(f'"@{column}@"', f"!function llmq_lmeval_text.{function}")
    return text + "\n"


def write_tasks(data_dir: Path, out_dir: Path) -> Path:
    """Write the GSM8K and MMLU task YAMLs for `data_dir` (gsm8k/, mmlu/dev, mmlu/test)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "llmq_lmeval_text.py").write_text(CONVERTERS_MODULE)
    gsm8k = dict(GSM8K_TASK)
    gsm8k["dataset_kwargs"] = {
        "data_files": {
            "train": str(data_dir / "gsm8k" / "train.jsonl"),
            "test": str(data_dir / "gsm8k" / "test.jsonl"),
        }
    }
    (out_dir / "llmq_gsm8k.yaml").write_text(_yaml(gsm8k))
    converters = {column: "as_text" for column in TEXT_COLUMNS} | {"answer": "as_index"}
    by_category: dict[str, list[str]] = {}
    for subject, category in SUBJECT_CATEGORIES.items():
        task = dict(MMLU_TEMPLATE)
        task["task"] = f"llmq_mmlu_{subject}"
        task["task_alias"] = subject
        task["tag"] = f"llmq_mmlu_{category}_tasks"
        task["description"] = (
            "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n"
        )
        task["dataset_kwargs"] = {
            "data_files": {
                "dev": str(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv"),
                "test": str(data_dir / "mmlu" / "test" / f"{subject}_test.csv"),
            },
            "keep_default_na": False,
            "na_filter": False,
            "converters": {column: f"@{column}@" for column in converters},
        }
        (out_dir / f"llmq_mmlu_{subject}.yaml").write_text(_yaml(task, converters))
        by_category.setdefault(category, []).append(subject)
    weighted = [{"metric": "acc", "weight_by_size": True}]
    for category in by_category:
        group = {
            "group": f"llmq_mmlu_{category}",
            "group_alias": category,
            "task": [f"llmq_mmlu_{category}_tasks"],
            "aggregate_metric_list": weighted,
            "metadata": {"version": 2},
        }
        (out_dir / f"_llmq_mmlu_{category}.yaml").write_text(_yaml(group))
    top = {
        "group": "llmq_mmlu",
        "task": [f"llmq_mmlu_{category}" for category in by_category],
        "aggregate_metric_list": weighted,
        "metadata": {"version": 2},
    }
    (out_dir / "_llmq_mmlu.yaml").write_text(_yaml(top))
    return out_dir


def _offline_env(output_dir: Path) -> dict[str, str]:
    return os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(output_dir / "hf"),
    }


def _task_args(
    tasks_dir: Path,
    tasks: list[str],
    num_fewshot: int | None,
    batch_size: int,
    output_dir: Path,
    limit: int | None,
) -> list[str]:
    """Tasks, shots (None: each task's own, GSM8K 5 and MMLU 0), batch, samples and limit."""
    args = ["--include_path", str(tasks_dir), "--tasks", ",".join(tasks)]
    if num_fewshot is not None:
        args += ["--num_fewshot", str(num_fewshot)]
    args += ["--batch_size", str(batch_size), "--log_samples", "--output_path", str(output_dir)]
    if limit:
        args += ["--limit", str(limit)]
    return args


def lmeval_run(
    python: str,
    model_dir: Path,
    tasks_dir: Path,
    tasks: list[str],
    *,
    num_fewshot: int | None,
    batch_size: int,
    output_dir: Path,
    limit: int | None = None,
    max_length: int = 512,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run lm-eval offline on these tasks, logging samples."""
    command = [
        python, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32,max_length={max_length}",
        "--device", "cpu",
    ]  # fmt: skip
    command += _task_args(tasks_dir, tasks, num_fewshot, batch_size, output_dir, limit)
    return command, _offline_env(output_dir)


def lmeval_api_run(
    python: str,
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    tasks_dir: Path,
    tasks: list[str],
    *,
    num_fewshot: int | None,
    max_length: int,
    output_dir: Path,
    limit: int | None = None,
    num_concurrent: int = 8,
    batch_size: int = 1,
    api_key: str = "",
) -> tuple[list[str], dict[str, str]]:
    """lm-eval's own OpenAI client (`local-completions`) against llmq's /v1/completions at
    `base_url`, sending token ids from the model's tokenizer, as its users run it.

    The client keeps `max_length - 1` tokens: max_length = context + 1 gives generation the
    HF backend's contexts (context - 256), max_length = context scores windows of context - 1
    tokens (the HF backend's have `context`: they match where the prompt fits). BOS is added
    as the HF backend's tokenizer adds it (the client's default is none). The key goes in
    OPENAI_API_KEY, where the client reads it."""
    model_args = ",".join(
        [
            f"model={model}",
            f"base_url={base_url.rstrip('/')}/v1/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={tokenizer_dir}",
            "tokenized_requests=True",
            "add_bos_token=True",
            f"max_length={max_length}",
            f"num_concurrent={num_concurrent}",
        ]
    )
    command = [python, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    command += _task_args(tasks_dir, tasks, num_fewshot, batch_size, output_dir, limit)
    return command, _offline_env(output_dir) | {"OPENAI_API_KEY": api_key}
