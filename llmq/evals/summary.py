"""A run's scores from its graded items, in the shape the API and the report show.

    {"metrics": {metric: Score},                       # the headline numbers
     "groups":  {category: {metric: Score}},           # MMLU categories
     "tasks":   {task: {metric: Score}}}               # GSM8K, or each MMLU subject

Every Score is {"value", "stderr", "n"}; see `scores` for how each is computed.
"""

from collections import defaultdict
from collections.abc import Iterable

from llmq.evals import mmlu
from llmq.evals.planning import Benchmark
from llmq.evals.scores import Score, group_score, task_score

# lm-eval's leaf order inside the mmlu group (its _mmlu.yaml), which fixes the float sums.
GROUP_ORDER = ["stem", "other", "social_sciences", "humanities"]


def summarize(benchmark: Benchmark, graded: Iterable[tuple[str, dict[str, float]]]) -> dict:
    """`graded`: (task, metrics) per graded item, in item order."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task, metrics in graded:
        for name, value in metrics.items():
            values[task][name].append(value)
    tasks = {
        task: {name: task_score(vals) for name, vals in by_metric.items()}
        for task, by_metric in values.items()
    }
    if benchmark is Benchmark.GSM8K:
        headline = dict(next(iter(tasks.values()), {}))
        return _as_dicts(headline, {}, tasks)
    groups = {}
    for category in mmlu.CATEGORIES:
        members = [s for s in mmlu.SUBJECTS if mmlu.SUBJECT_CATEGORIES[s] == category]
        score = group_score(tasks[s][mmlu.ACC] for s in members if s in tasks)
        if score is not None:
            groups[category] = {mmlu.ACC: score}
    ordered = [
        tasks[s][mmlu.ACC]
        for category in GROUP_ORDER
        for s in mmlu.SUBJECTS
        if mmlu.SUBJECT_CATEGORIES[s] == category and s in tasks
    ]
    overall = group_score(ordered)
    headline = {mmlu.ACC: overall} if overall is not None else {}
    return _as_dicts(headline, groups, tasks)


def _as_dicts(headline, groups, tasks) -> dict:
    def scores(by_metric: dict[str, Score | None]) -> dict:
        return {name: s.as_dict() for name, s in by_metric.items() if s is not None}

    return {
        "metrics": scores(headline),
        "groups": {name: scores(by_metric) for name, by_metric in groups.items()},
        "tasks": {name: scores(by_metric) for name, by_metric in sorted(tasks.items())},
    }
