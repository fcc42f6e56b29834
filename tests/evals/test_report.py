"""Reports: the JSON holds the run as the API gave it; the chart is a PNG."""

import json

from llmq.evals.report import scores_table, write_report


def score(value: float) -> dict:
    return {"value": value, "stderr": 0.05, "n": 10}


MMLU = {
    "id": "r1",
    "benchmark": "mmlu",
    "model": "m",
    "num_fewshot": 5,
    "scores": {
        "metrics": {"acc": score(0.3)},
        "groups": {"stem": {"acc": score(0.2)}, "other": {"acc": score(0.4)}},
        "tasks": {"anatomy": {"acc": score(0.2)}, "virology": {"acc": score(0.4)}},
    },
}
GSM8K = {
    "id": "r2",
    "benchmark": "gsm8k",
    "model": "m",
    "num_fewshot": 5,
    "scores": {
        "metrics": {
            "exact_match,strict-match": score(0.1),
            "exact_match,flexible-extract": score(0.2),
        },
        "groups": {},
        "tasks": {},
    },
}


def test_write_report_writes_the_run_as_json_and_a_png_chart(tmp_path):
    for run in (MMLU, GSM8K):
        json_path, png_path = write_report(run, tmp_path)
        assert json.loads(json_path.read_text()) == run
        assert png_path.read_bytes().startswith(b"\x89PNG")


def test_scores_table_lists_headline_then_categories():
    table = scores_table(MMLU)
    assert [c.header for c in table.columns] == ["group", "metric", "value", "± stderr", "n"]
    assert list(table.columns[0].cells) == ["mmlu", "  other", "  stem"]
    assert list(table.columns[2].cells) == ["0.3000", "0.4000", "0.2000"]


def test_write_report_keeps_its_files_in_the_folder_whatever_the_run_says(tmp_path):
    folder = tmp_path / "reports"
    run = {**GSM8K, "benchmark": "../../escaped", "model": "a/../b\x00", "id": "..\\c"}
    written = write_report(run, folder)
    assert [path.parent for path in written] == [folder] * len(written)
    assert written[0].name == ".._.._escaped-a_.._b_-.._c.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


def test_write_report_keeps_a_dotted_model_id_whole(tmp_path):
    written = write_report({**GSM8K, "model": "qwen2.5-0.5b"}, tmp_path)
    assert written[0].name == "gsm8k-qwen2.5-0.5b-r2.json"
