"""A run's items: one job request per benchmark question, built from its settings and data.

Items are computed once, when the run starts, and stored; the run never reads its data again,
so it resumes the same after a restart even if the files change.
"""

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llmq.errors import InvalidRequest
from llmq.evals import gsm8k, mmlu
from llmq.evals.datasets import (
    GSM8K_FILES,
    DatasetSource,
    LocalDataset,
    load_gsm8k,
    load_mmlu_subject,
    mmlu_files,
)
from llmq.protocol import JobKind, SamplingParams, ScoreParams


class Benchmark(StrEnum):
    GSM8K = "gsm8k"
    MMLU = "mmlu"

    @property
    def default_fewshot(self) -> int:
        """lm-eval's: gsm8k.yaml says 5; the default mmlu task sets none, so zero-shot."""
        return gsm8k.DEFAULT_FEWSHOT if self is Benchmark.GSM8K else mmlu.DEFAULT_FEWSHOT

    @property
    def scores(self) -> bool:
        """Whether its items are scored by log-likelihood (else generated and graded)."""
        return self is Benchmark.MMLU

    @property
    def primary_metric(self) -> str:
        return gsm8k.STRICT_MATCH if self is Benchmark.GSM8K else mmlu.ACC


@dataclass(frozen=True)
class RunSettings:
    benchmark: Benchmark
    num_fewshot: int
    limit: int | None  # items per task (per subject for MMLU), from the start of each
    subjects: list[str] | None  # MMLU only; None is all 57
    dataset: DatasetSource  # from resolve_dataset: a folder in the data directory, or the hub


@dataclass(frozen=True)
class ModelFacts:
    """What the prompts depend on: the model, its context and its end-of-sequence text."""

    model: str
    source: str
    max_length: int  # tokens the model reads; lm-eval's max_length
    eos_text: str | None


@dataclass(frozen=True)
class PlannedItem:
    task: str
    doc_index: int
    kind: JobKind
    input: dict[str, Any]
    params: dict[str, Any]
    gold: str

    def request_key(self, facts: ModelFacts) -> str:
        """Equal for requests that must give equal results: same model, kind, input, params."""
        request = [facts.model, facts.source, self.kind.value, self.input, self.params]
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def check_data(settings: RunSettings) -> None:
    """Refuse now what planning would refuse later: a file of a local dataset that is missing
    or that a link leads out of the data directory."""
    source = settings.dataset
    if not isinstance(source, LocalDataset):
        return  # the hub is asked when the run is planned
    if settings.benchmark is Benchmark.GSM8K:
        source.files(GSM8K_FILES, "GSM8K")
    else:
        subjects = settings.subjects or mmlu.SUBJECTS
        source.files([name for s in subjects for name in mmlu_files(s)], "MMLU")


def plan(settings: RunSettings, facts: ModelFacts) -> list[PlannedItem]:
    if settings.benchmark is Benchmark.GSM8K:
        return _plan_gsm8k(settings, facts)
    return _plan_mmlu(settings, facts)


def _plan_gsm8k(settings: RunSettings, facts: ModelFacts) -> list[PlannedItem]:
    room = facts.max_length - gsm8k.MAX_GEN_TOKENS
    if room < 1:
        raise InvalidRequest(
            f"model {facts.model!r} reads {facts.max_length} tokens; GSM8K needs more than "
            f"the {gsm8k.MAX_GEN_TOKENS} it generates",
            param="model",
        )
    data = load_gsm8k(settings.dataset)
    test = data.test[: settings.limit]
    params = SamplingParams(
        max_tokens=gsm8k.MAX_GEN_TOKENS,
        temperature=0.0,
        stop=gsm8k.stop_strings(facts.eos_text),
        truncate_prompt_tokens=room,
    ).model_dump(mode="json")
    prompts = gsm8k.prompts(data.train, test, settings.num_fewshot)
    return [
        PlannedItem(gsm8k.TASK, index, JobKind.GENERATE, {"prompt": prompt}, params, doc.answer)
        for index, (doc, prompt) in enumerate(zip(test, prompts, strict=True))
    ]


def _plan_mmlu(settings: RunSettings, facts: ModelFacts) -> list[PlannedItem]:
    params = ScoreParams(max_length=facts.max_length).model_dump(mode="json")
    items = []
    for subject in settings.subjects or mmlu.SUBJECTS:
        data = load_mmlu_subject(settings.dataset, subject)
        test = data.test[: settings.limit]
        prompts = mmlu.prompts(subject, data.dev, test, settings.num_fewshot)
        for index, (question, prompt) in enumerate(zip(test, prompts, strict=True)):
            given = {"prompt": prompt, "continuations": mmlu.CONTINUATIONS}
            items.append(
                PlannedItem(subject, index, JobKind.SCORE, given, params, str(question.answer))
            )
    return items
