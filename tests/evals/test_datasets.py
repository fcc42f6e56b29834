"""Benchmark files in each layout llmq reads: every cell stays the text it is."""

import pytest

from llmq.evals.datasets import (
    DatasetUnavailable,
    HubDataset,
    LocalDataset,
    load_gsm8k,
    load_mmlu_subject,
    read_jsonl,
    read_mmlu_csv,
)
from tests.evals.conftest import (
    ALGEBRA_TEST,
    GSM8K_TEST,
    write_benchmarks,
    write_cais_csv,
    write_hendrycks_csv,
)


def test_read_gsm8k_jsonl_keeps_question_and_answer(tmp_path):
    root = write_benchmarks(tmp_path)
    data = load_gsm8k(LocalDataset(root.resolve(), "gsm8k"))
    assert len(data.train) == 8
    assert [p.question for p in data.test] == [row["question"] for row in GSM8K_TEST]
    assert data.test[0].answer.endswith("#### 1,000")


def test_read_cais_csv_keeps_none_and_decimal_text(tmp_path):
    path = tmp_path / "x_test.csv"
    write_cais_csv(path, ALGEBRA_TEST)
    questions = read_mmlu_csv(path)
    assert questions[0].question == "  Which value is a half?  "
    assert questions[0].choices == ("0.50", "None", "2", "1/3")
    assert questions[1].choices[0] == "None"
    assert [q.answer for q in questions] == [0, 0, 1]


def test_read_hendrycks_csv_maps_letters_to_indices(tmp_path):
    path = tmp_path / "x_test.csv"
    write_hendrycks_csv(path, ALGEBRA_TEST)
    questions = read_mmlu_csv(path)
    assert questions[0].choices == ("0.50", "None", "2", "1/3")
    assert [q.answer for q in questions] == [0, 0, 1]


def test_both_csv_layouts_read_the_same(tmp_path):
    write_cais_csv(tmp_path / "a.csv", ALGEBRA_TEST)
    write_hendrycks_csv(tmp_path / "b.csv", ALGEBRA_TEST)
    assert read_mmlu_csv(tmp_path / "a.csv") == read_mmlu_csv(tmp_path / "b.csv")


def test_read_mmlu_csv_with_a_bad_answer_says_which_row(tmp_path):
    path = tmp_path / "bad_test.csv"
    path.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n")
    with pytest.raises(DatasetUnavailable, match="row 2 answer '7' is not an index 0-3"):
        read_mmlu_csv(path)
    path.write_text("q,a,b,c,d,E\n")
    with pytest.raises(DatasetUnavailable, match="row 1 answer 'E' is not a letter A-D"):
        read_mmlu_csv(path)


def test_read_gsm8k_jsonl_without_answer_names_the_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(DatasetUnavailable, match=r"test.jsonl:2 is not a GSM8K record"):
        read_jsonl(path)


def test_load_mmlu_subject_missing_files_names_them(tmp_path):
    (tmp_path / "mmlu").mkdir()
    with pytest.raises(DatasetUnavailable, match="mmlu/dev/anatomy_dev.csv, mmlu/test/anatomy"):
        load_mmlu_subject(LocalDataset(tmp_path.resolve(), "mmlu"), "anatomy")


def test_hub_id_without_datasets_package_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DatasetUnavailable, match=r"pip install 'llmq\[hub\]'"):
        load_gsm8k(HubDataset("openai/gsm8k"))
