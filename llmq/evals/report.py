"""What people look at after a run: a table in the terminal, a JSON report, and a PNG chart
(MMLU: accuracy per category and per subject with standard-error bars; GSM8K: exact match by
filter). The chart needs matplotlib (`pip install 'llmq[evals]'`); without it only JSON is
written."""

import json
import re
from pathlib import Path

from rich.table import Table

MMLU_CHANCE = 0.25
# Anything else in a report's file name becomes `_`: no separator, NUL or control character.
UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def scores_table(run: dict) -> Table:
    """Headline metrics, then MMLU's categories, each as value ± standard error (n)."""
    table = Table(title=f"{run['benchmark']} · {run['model']} · {run['num_fewshot']}-shot")
    table.add_column("group")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("± stderr", justify="right")
    table.add_column("n", justify="right")
    scores = run.get("scores") or {"metrics": {}, "groups": {}}
    rows = [(run["benchmark"], scores["metrics"])]
    rows += [(f"  {name}", metrics) for name, metrics in sorted(scores["groups"].items())]
    for group, metrics in rows:
        for metric, score in metrics.items():
            stderr = "" if score["stderr"] is None else f"{score['stderr']:.4f}"
            table.add_row(group, metric, f"{score['value']:.4f}", stderr, str(score["n"]))
    return table


def write_report(run: dict, folder: Path) -> list[Path]:
    """<folder>/<benchmark>-<model>-<run id>.json, and .png when matplotlib is installed."""
    folder.mkdir(parents=True, exist_ok=True)
    # The name comes from the server's answer: whatever it says, the files stay in `folder`.
    name = "-".join(UNSAFE_IN_NAME.sub("_", str(run[key])) for key in ("benchmark", "model", "id"))
    # Suffixes are appended: with_suffix would cut a dotted model id (qwen2.5-0.5b) short.
    written = [folder / f"{name}.json"]
    written[0].write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")  # files only, never a window
    written.append(folder / f"{name}.png")
    chart = _mmlu_chart if run["benchmark"] == "mmlu" else _gsm8k_chart
    chart(run, written[1])
    return written


def _bars(axis, labels, scores, horizontal: bool = False) -> None:
    values = [s["value"] for s in scores]
    errors = [s["stderr"] or 0.0 for s in scores]
    if horizontal:
        axis.barh(labels, values, xerr=errors, color="#4c72b0", ecolor="#333333", capsize=2)
        axis.set_xlim(0, 1)
    else:
        axis.bar(labels, values, yerr=errors, color="#4c72b0", ecolor="#333333", capsize=4)
        axis.set_ylim(0, 1)


def _mmlu_chart(run: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    scores = run["scores"]
    subjects = sorted(scores["tasks"].items(), key=lambda kv: kv[1]["acc"]["value"])
    groups = sorted(scores["groups"].items())
    overall = scores["metrics"].get("acc")
    height = 3 + 0.22 * len(subjects)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, height), gridspec_kw={"height_ratios": [3, max(3, len(subjects) / 4)]}
    )
    labels = [name for name, _ in groups] + (["overall"] if overall else [])
    values = [metrics["acc"] for _, metrics in groups] + ([overall] if overall else [])
    _bars(top, labels, values)
    top.axhline(MMLU_CHANCE, linestyle="--", color="grey", linewidth=1, label="chance")
    top.set_ylabel("accuracy")
    top.set_title(f"MMLU · {run['model']} · {run['num_fewshot']}-shot (bars: ± 1 stderr)")
    top.legend(loc="upper right")
    _bars(bottom, [name for name, _ in subjects], [m["acc"] for _, m in subjects], True)
    bottom.axvline(MMLU_CHANCE, linestyle="--", color="grey", linewidth=1)
    bottom.set_xlabel("accuracy")
    bottom.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _gsm8k_chart(run: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    metrics = run["scores"]["metrics"]
    figure, axis = plt.subplots(figsize=(6, 4))
    _bars(axis, [name.split(",")[1] for name in metrics], list(metrics.values()))
    axis.set_ylabel("exact match")
    axis.set_title(f"GSM8K · {run['model']} · {run['num_fewshot']}-shot (bars: ± 1 stderr)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
