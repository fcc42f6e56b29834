"""Aggregation as lm-eval does it: sample standard errors, size-weighted groups, pooled errors."""

import math

import pytest

from llmq.evals.planning import Benchmark
from llmq.evals.scores import Score, group_score, task_score
from llmq.evals.summary import summarize


def test_task_score_is_mean_with_sample_standard_error():
    score = task_score([1.0, 0.0, 1.0, 1.0])
    assert score.value == 0.75
    mean = 0.75
    expected = math.sqrt(sum((x - mean) ** 2 for x in [1, 0, 1, 1]) / 3) / math.sqrt(4)
    assert score.stderr == expected
    assert score.n == 4


def test_task_score_of_one_item_has_no_stderr():
    assert task_score([1.0]) == Score(1.0, None, 1)
    assert task_score([]) is None


def test_group_score_weights_tasks_by_size_and_pools_errors():
    a, b = task_score([1.0, 0.0]), task_score([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    group = group_score([a, b])
    assert group.value == pytest.approx(4 / 8)
    pooled = ((2 - 1) * a.stderr**2 * 2 + (6 - 1) * b.stderr**2 * 6) / (8 - 2)
    assert group.stderr == pytest.approx(math.sqrt(pooled / 8))
    assert group.n == 8


def test_mmlu_summary_has_subjects_categories_and_overall():
    graded = [
        ("anatomy", {"acc": 1.0}),
        ("anatomy", {"acc": 0.0}),
        ("abstract_algebra", {"acc": 1.0}),
        ("abstract_algebra", {"acc": 1.0}),
        ("philosophy", {"acc": 0.0}),
        ("philosophy", {"acc": 0.0}),
    ]
    summary = summarize(Benchmark.MMLU, graded)
    assert summary["tasks"]["anatomy"]["acc"]["value"] == 0.5
    assert summary["groups"]["stem"]["acc"]["value"] == 0.75
    assert summary["groups"]["humanities"]["acc"]["value"] == 0.0
    assert summary["metrics"]["acc"]["value"] == 0.5
    assert summary["metrics"]["acc"]["n"] == 6


def test_gsm8k_summary_reports_both_filters():
    graded = [
        ("gsm8k", {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}),
        ("gsm8k", {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}),
    ]
    metrics = summarize(Benchmark.GSM8K, graded)["metrics"]
    assert metrics["exact_match,strict-match"]["value"] == 0.5
    assert metrics["exact_match,flexible-extract"]["value"] == 1.0
