"""An item's grade from its finished job: the answer the benchmark extracts, and its metrics."""

from dataclasses import dataclass
from typing import Any

from llmq.evals import gsm8k, mmlu
from llmq.evals.datasets import LETTERS
from llmq.evals.planning import Benchmark


@dataclass(frozen=True)
class Grade:
    output: str  # what the model produced: its text, or the letter it scored highest
    details: dict[str, Any]  # the extracted answers, or the log-likelihoods
    metrics: dict[str, float]


def grade_generation(text: str, gold: str) -> Grade:
    answers, metrics = gsm8k.grade(text, gold)
    return Grade(text, {"answers": answers}, metrics)


def grade_scores(loglikelihoods: list[float], gold: str) -> Grade:
    prediction, metrics = mmlu.grade(loglikelihoods, int(gold))
    details = {"loglikelihoods": loglikelihoods, "prediction": prediction}
    return Grade(LETTERS[prediction], details, metrics)


def is_correct(benchmark: Benchmark, metrics: dict[str, float] | None) -> bool | None:
    """The primary metric as a yes or no (GSM8K: strict-match; MMLU: acc)."""
    if metrics is None:
        return None
    return metrics.get(benchmark.primary_metric) == 1.0
