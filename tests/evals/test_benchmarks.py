"""Prompts, answer extraction and metrics, asserted as the exact strings lm-eval 0.4.x makes."""

import random

import pytest

from llmq.evals import gsm8k, mmlu
from llmq.evals.datasets import DatasetUnavailable, MathProblem, Question


def problem(n: int) -> MathProblem:
    return MathProblem(f"q{n}?", f"a{n}\n#### {n}")


TRAIN = [problem(n) for n in range(8)]
TEST = [problem(100), problem(101)]


def test_gsm8k_prompt_draws_shots_with_random_1234_per_document_in_order():
    prompts = gsm8k.prompts(TRAIN, TEST, num_fewshot=2)
    # random.Random(1234).sample over 8 documents, twice in a row: [7, 0], then [0, 7].
    assert prompts[0] == (
        "Question: q7?\nAnswer: a7\n#### 7\n\n"
        "Question: q0?\nAnswer: a0\n#### 0\n\n"
        "Question: q100?\nAnswer:"
    )
    assert prompts[1] == (
        "Question: q0?\nAnswer: a0\n#### 0\n\n"
        "Question: q7?\nAnswer: a7\n#### 7\n\n"
        "Question: q101?\nAnswer:"
    )
    rnd = random.Random(1234)
    expected = [[TRAIN[i] for i in rnd.sample(range(8), 2)] for _ in TEST]
    assert [p.count("Question:") - 1 for p in prompts] == [len(e) for e in expected]


def test_gsm8k_zero_shot_prompt_is_the_question_alone():
    assert gsm8k.prompts(TRAIN, TEST, num_fewshot=0) == [
        "Question: q100?\nAnswer:",
        "Question: q101?\nAnswer:",
    ]


def test_gsm8k_stops_add_the_tokenizer_eos_text_once():
    assert gsm8k.stop_strings("</s>") == ["Question:", "</s>", "<|im_end|>"]
    assert gsm8k.stop_strings("<|endoftext|>")[-1] == "<|endoftext|>"


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("so 5 + 7 = 12\n#### 12", "12", "12"),
        ("#### -1,234.5 then 7", "-1,234.5", "7"),
        ("costs $1,000.", "[invalid]", "$1,000."),
        ("no numbers", "[invalid]", "[invalid]"),
        ("answer 7", "[invalid]", "7"),
        ("#### 3\n#### 4", "3", "4"),
    ],
)
def test_gsm8k_filters_extract_like_lm_eval(text, strict, flexible):
    assert gsm8k.extract(text, "strict-match") == strict
    assert gsm8k.extract(text, "flexible-extract") == flexible


def test_gsm8k_exact_match_ignores_commas_dollars_case_and_final_period():
    reference = "1,200 - 200 = 1,000 beads.\n#### 1,000"
    answers, metrics = gsm8k.grade("They have $1,000.\n#### 1000.", reference)
    assert answers == {"strict-match": "1000.", "flexible-extract": "1000."}
    assert metrics == {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0}
    _, metrics = gsm8k.grade("#### 999 or 1,000", reference)
    assert metrics == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}


QUESTIONS = [
    Question("  What is 2 + 2?\n", ("3", "4", "None", "0.50"), 1),
    Question("Which is even?", ("1", "3", "8", "9"), 2),
]


def test_mmlu_prompt_has_description_first_n_dev_shots_and_the_question():
    prompts = mmlu.prompts("high_school_us_history", QUESTIONS, [QUESTIONS[1]], num_fewshot=1)
    assert prompts == [
        "The following are multiple choice questions (with answers) about high school us "
        "history.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. None\nD. 0.50\nAnswer: B\n\n"
        "Which is even?\nA. 1\nB. 3\nC. 8\nD. 9\nAnswer:"
    ]


def test_mmlu_question_is_stripped_and_choices_kept_as_text():
    assert mmlu.render(QUESTIONS[0]) == "What is 2 + 2?\nA. 3\nB. 4\nC. None\nD. 0.50\nAnswer:"
    assert mmlu.CONTINUATIONS == [" A", " B", " C", " D"]


def test_mmlu_more_shots_than_dev_questions_is_refused():
    with pytest.raises(DatasetUnavailable, match="anatomy has 2 dev questions; num_fewshot 5"):
        mmlu.prompts("anatomy", QUESTIONS, QUESTIONS, num_fewshot=5)


def test_mmlu_prediction_takes_the_first_highest_loglikelihood():
    assert mmlu.predict([-2.0, -1.0, -1.0, -3.0]) == 1
    assert mmlu.grade([-2.0, -1.0, -1.5, -3.0], answer=1) == (1, {"acc": 1.0})
    assert mmlu.grade([-0.5, -1.0, -1.5, -3.0], answer=1) == (0, {"acc": 0.0})


def test_mmlu_has_57_subjects_in_four_categories():
    assert len(mmlu.SUBJECTS) == 57
    assert set(mmlu.SUBJECT_CATEGORIES.values()) == set(mmlu.CATEGORIES)
