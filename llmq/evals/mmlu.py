"""MMLU as lm-evaluation-harness 0.4.x runs its default `mmlu` group (tasks/mmlu/default/).

Prompt, per subject
    The description `The following are multiple choice questions (with answers) about
    {subject with "_" as spaces}.\\n\\n`, then the first `num_fewshot` dev questions in order,
    each rendered as below and followed by ` {answer letter}\\n\\n`, then the test question:
    `{question.strip()}\\nA. {choice 0}\\nB. {choice 1}\\nC. {choice 2}\\nD. {choice 3}\\nAnswer:`.
    lm-eval's default is zero-shot; the usual figure is 5-shot.

Scoring
    The continuations ` A`, ` B`, ` C`, ` D` are scored by log-likelihood after the prompt:
    prompt and continuation are encoded together, the continuation's tokens being those past the
    prompt's own encoding; the model sees the last `max length` tokens of prompt + continuation
    minus its final token, and the score is the sum of the continuation tokens' log-softmax
    probabilities. The prediction is the first choice with the highest score.

Metric
    acc, the mean of (prediction == answer) over a subject's test questions. Categories (stem,
    humanities, social sciences, other) and the overall score weight subjects by size, which
    makes them the mean over all their questions (see `scores`).
"""

from llmq.evals.datasets import LETTERS, DatasetUnavailable, Question

DEFAULT_FEWSHOT = 0
ACC = "acc"
CONTINUATIONS = [f" {letter}" for letter in LETTERS]

SUBJECT_CATEGORIES = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
SUBJECTS = list(SUBJECT_CATEGORIES)
CATEGORIES = ["stem", "humanities", "social_sciences", "other"]


def description(subject: str) -> str:
    return (
        "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n"
    )


def render(question: Question) -> str:
    lines = [question.question.strip()]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, question.choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def prompts(subject: str, dev: list[Question], test: list[Question], num_fewshot: int) -> list[str]:
    if num_fewshot > len(dev):
        raise DatasetUnavailable(
            f"{subject} has {len(dev)} dev questions; num_fewshot {num_fewshot} needs that many",
            param="num_fewshot",
        )
    shots = "".join(f"{render(q)} {LETTERS[q.answer]}\n\n" for q in dev[:num_fewshot])
    prefix = description(subject) + shots
    return [prefix + render(question) for question in test]


def predict(loglikelihoods: list[float]) -> int:
    """The first choice with the highest log-likelihood (numpy.argmax's tie rule)."""
    return max(range(len(loglikelihoods)), key=lambda i: (loglikelihoods[i], -i))


def grade(loglikelihoods: list[float], answer: int) -> tuple[int, dict[str, float]]:
    prediction = predict(loglikelihoods)
    return prediction, {ACC: float(prediction == answer)}
