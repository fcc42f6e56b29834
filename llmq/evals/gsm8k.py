"""GSM8K as lm-evaluation-harness 0.4.x runs its `gsm8k` task (tasks/gsm8k/gsm8k.yaml).

Prompt
    Each test document, in order, gets `num_fewshot` examples drawn from the train split by one
    `random.Random(1234)` shared by the whole run: `rnd.sample(train, num_fewshot)` per document
    (no draw when `num_fewshot` is 0). An example renders as
    `Question: {question}\\nAnswer: {answer}\\n\\n` (the target delimiter is a space, the
    few-shot delimiter a blank line) and the document as `Question: {question}\\nAnswer:`.

Generation
    Greedy, at most 256 new tokens, stopping at `Question:`, `</s>`, `<|im_end|>` and the
    tokenizer's end-of-sequence text (and at the end-of-sequence token). The prompt is encoded
    with the tokenizer's default special tokens and left-truncated to the model's maximum length
    minus 256 tokens. The text is cut before the first stop string.

Filters (each a regex, then the first response)
    strict-match: `#### (\\-?[0-9\\.\\,]+)`, the first match.
    flexible-extract: `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match, its first non-empty group.
    A match is stripped of surrounding whitespace; no match gives `[invalid]`.

Metric
    exact_match: prediction and reference (the whole reference solution) each lose every `,`,
    `$`, everything up to the last `#### `, and a final `.`, in that order, are lower-cased, and
    must then be equal. The score is the mean over documents.
"""

import random
import re

from llmq.evals.datasets import MathProblem

TASK = "gsm8k"
FEWSHOT_SEED = 1234
DEFAULT_FEWSHOT = 5
MAX_GEN_TOKENS = 256
STOP = ["Question:", "</s>", "<|im_end|>"]
FALLBACK = "[invalid]"

STRICT_MATCH = "exact_match,strict-match"
FLEXIBLE_EXTRACT = "exact_match,flexible-extract"
# filter name -> (regex, which match to keep)
FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
IGNORED = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def render(problem: MathProblem) -> str:
    return f"Question: {problem.question}\nAnswer:"


def prompts(train: list[MathProblem], test: list[MathProblem], num_fewshot: int) -> list[str]:
    """The prompt of each test problem, in order: the few-shot draw depends on that order."""
    rnd = random.Random(FEWSHOT_SEED)
    out = []
    for problem in test:
        shots = rnd.sample(train, num_fewshot) if num_fewshot > 0 else []
        examples = "".join(f"{render(shot)} {shot.answer}\n\n" for shot in shots)
        out.append(examples + render(problem))
    return out


def stop_strings(eos_text: str | None) -> list[str]:
    """lm-eval appends the tokenizer's end-of-sequence text to the task's stops."""
    stops = list(STOP)
    if eos_text and eos_text not in stops:
        stops.append(eos_text)
    return stops


def extract(text: str, filter_name: str) -> str:
    pattern, which = FILTERS[filter_name]
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[which]
    if isinstance(match, tuple):  # several groups: the first one that matched
        match = next((group for group in match if group), FALLBACK)
    return match.strip()


def normalize(text: str) -> str:
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def grade(generated: str, reference: str) -> tuple[dict[str, str], dict[str, float]]:
    """The answer each filter extracts, and exact_match per filter (1.0 or 0.0)."""
    answers = {name: extract(generated, name) for name in FILTERS}
    gold = normalize(reference)
    metrics = {
        f"exact_match,{name}": float(normalize(answer) == gold) for name, answer in answers.items()
    }
    return answers, metrics
