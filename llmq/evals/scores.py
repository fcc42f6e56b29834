"""Scores as lm-evaluation-harness 0.4.x aggregates them (lm_eval/api/metrics.py, api/group.py).

- A task's score is the mean of its per-item values; its standard error is the sample standard
  deviation (n - 1 in the denominator) over the square root of n, or None below two items.
- A group (an MMLU category, or all of MMLU) weights its tasks by size:
  sum(score_i * n_i) / sum(n_i), a mean over all its items; its standard error is the pooled
  one, sqrt(sum((n_i - 1) * se_i^2 * n_i) / (sum(n_i) - k) / sum(n_i)) over its k tasks, and
  None when a task has none.

The formulas are evaluated in lm-eval's order of operations, so the floats come out the same.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def task_score(values: list[float]) -> Score | None:
    if not values:
        return None
    mean = sum(values) / len(values)
    stderr = None
    if len(values) > 1:
        variance = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
        stderr = math.sqrt(variance) / math.sqrt(len(values))
    return Score(mean, stderr, len(values))


def group_score(tasks: Iterable[Score]) -> Score | None:
    tasks = [t for t in tasks if t is not None]
    if not tasks:
        return None
    sizes = [t.n for t in tasks]
    value = sum(t.value * t.n for t in tasks) / sum(sizes)
    stderr = None
    if all(t.stderr is not None for t in tasks) and sum(sizes) > len(sizes):
        pooled = sum((t.n - 1) * t.stderr**2 * t.n for t in tasks) / (sum(sizes) - len(sizes))
        stderr = math.sqrt(pooled / sum(sizes))
    return Score(value, stderr, sum(sizes))
