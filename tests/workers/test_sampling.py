"""Per-row logit processing and log-probabilities inside the batching engine, checked against
Transformers' own logits processors and generate(), and the model's own log_softmax."""

import uuid

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from llmq.protocol import SamplingParams
from tests.api.test_logprobs import CLOSE, model_logprobs
from workers.sampling import (
    RowLogprobs,
    TokenHistory,
    adjust_logits,
    choose_tokens,
    sample_token,
    token_logprobs,
)

VOCAB = 512


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, as its documentation writes them:
    mu[j] -> mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting generated tokens."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            for token in set(input_ids[row, self.prompt_length :].tolist()):
                count = input_ids[row, self.prompt_length :].tolist().count(token)
                scores[row, token] -= count * self.frequency + self.presence
        return scores


def hf_processors(params: SamplingParams, prompt_length: int) -> LogitsProcessorList:
    """The same settings as Transformers' processors, in llmq's (vLLM's) order."""
    processors = LogitsProcessorList()
    if params.logit_bias:
        bias = {(token,): value for token, value in params.logit_bias.items()}
        processors.append(SequenceBiasLogitsProcessor(bias))
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            OpenAIPenalties(prompt_length, params.presence_penalty, params.frequency_penalty)
        )
    return processors


CASES = {
    "repetition": {"repetition_penalty": 1.7},
    "below one": {"repetition_penalty": 0.6},
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": -0.8},
    "bias": {"logit_bias": {7: 5.0, 100: -100.0, 3: 42.0}},
    "all": {
        "repetition_penalty": 1.3,
        "presence_penalty": 0.4,
        "frequency_penalty": 1.1,
        "logit_bias": {9: 3.0},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adjusted_logits_equal_transformers_processors(case):
    params = SamplingParams(max_tokens=8, **CASES[case])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (12,), generator=generator).tolist()
    generated = torch.randint(0, VOCAB, (9,), generator=generator).tolist() + [7, 7, 3]
    logits = torch.randn(VOCAB, generator=generator) * 4
    history = TokenHistory(prompt, VOCAB)
    for token in generated:
        history.add(token)
    ours = adjust_logits(logits.unsqueeze(0), [params], [history])[0]
    input_ids = torch.tensor([prompt + generated])
    theirs = hf_processors(params, len(prompt))(input_ids, logits.clone().unsqueeze(0))[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_min_p_keeps_what_transformers_keeps():
    params = SamplingParams(max_tokens=1, temperature=0.7, min_p=0.2)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    kept = MinPLogitsWarper(0.2)(None, (logits / 0.7).unsqueeze(0))[0] > float("-inf")
    drawn = {
        sample_token(logits, params, torch.Generator().manual_seed(seed)) for seed in range(300)
    }
    assert drawn <= set(kept.nonzero().flatten().tolist())
    assert len(drawn) > 1


def test_token_logprobs_are_log_softmax_with_the_true_top_k():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    entries = token_logprobs(logits, [5, 6, 7], [0, 3, 20])
    expected = torch.log_softmax(logits, -1)
    for row, (token, logprob, alternatives) in enumerate(entries):
        assert logprob == pytest.approx(expected[row, token].item(), abs=1e-6)
        best = expected[row].topk(len(alternatives))
        assert [a for a, _ in alternatives] == best.indices.tolist()
    assert [len(e[2]) for e in entries] == [0, 3, 20]


def test_best_tokens_are_the_argmax_and_leave_out_ties():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[1, [10, 20]] = logits[1].max() + 1.0  # two best tokens alike: argmax takes the first
    rows = RowLogprobs(torch.log_softmax(logits, -1), [5, 1, 0, 5])
    assert rows.best_tokens() == {row: int(logits[row].argmax()) for row in (0, 2, 3)}


def test_choose_tokens_takes_known_tokens_only_when_they_cover_every_greedy_row():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))
    greedy, sampled = SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, temperature=1)
    params = [greedy, sampled, greedy]
    generators = [torch.Generator().manual_seed(0) for _ in params]
    argmax = logits.argmax(-1).tolist()
    # Known tokens stand in for the argmax (here made different from it to tell them apart).
    known = {0: argmax[0] + 1, 2: argmax[2] + 1}
    chosen = choose_tokens(logits, params, generators, known=known)
    assert [chosen[0], chosen[2]] == [argmax[0] + 1, argmax[2] + 1]
    # A greedy row left out: the argmax runs for every row, as without any.
    chosen = choose_tokens(logits, params, generators, known={0: argmax[0] + 1})
    assert [chosen[0], chosen[2]] == [argmax[0], argmax[2]]


def test_entries_take_a_token_outside_the_top_from_the_log_probabilities():
    logprobs = torch.log_softmax(
        torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5)), -1
    )
    worst = logprobs.argmin(-1).tolist()
    best = logprobs.argmax(-1).tolist()
    entries = RowLogprobs(logprobs, [2, 2]).entries([worst[0], best[1]])
    assert [e[1] for e in entries] == [logprobs[0, worst[0]].item(), logprobs[1, best[1]].item()]
    assert [[a for a, _ in e[2]] for e in entries] == logprobs.topk(2).indices.tolist()


# -- in the engine, on the real tiny model --------------------------------------------------


@pytest.fixture(scope="module")
def engine(host):
    from workers.engine import GenerationEngine

    engine = GenerationEngine(host, max_batch_size=16, max_batch_tokens=100_000, max_wait_ms=50)
    engine.start()
    yield engine
    engine.stop()


PROMPTS = ["Once upon a time", "The dog", "Lily liked to play in the park with", "0 1 2 3"]


def generate(engine, host, jobs: list[tuple[str, dict]]):
    """Submit all at once (they share prefill and decode steps), then wait for all."""
    from workers.engine import GenerationRequest

    futures = [
        engine.submit(
            GenerationRequest(
                uuid.uuid4(),
                host.encode(prompt),
                SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2, **params),
            )
        )
        for prompt, params in jobs
    ]
    return [future.result(timeout=60) for future in futures]


def hf_greedy(host, prompt: str, params: SamplingParams) -> list[int]:
    ids = torch.tensor([host.encode(prompt)])
    with torch.inference_mode():
        out = host.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            logits_processor=hf_processors(params, ids.shape[1]),
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def test_each_row_of_a_mixed_batch_generates_as_transformers_does(engine, host):
    jobs = [(PROMPTS[i % len(PROMPTS)], CASES[case]) for i, case in enumerate(sorted(CASES))]
    jobs += [(PROMPTS[0], {})]  # a plain row beside them
    outputs = generate(engine, host, jobs)
    for (prompt, settings), output in zip(jobs, outputs, strict=True):
        params = SamplingParams(max_tokens=10, **settings)
        ours = [token for token, _, _ in output.logprobs]
        assert ours == hf_greedy(host, prompt, params), settings


def test_logprobs_in_a_batch_are_the_models_own(engine, host):
    jobs = [(prompt, {"temperature": 0.8, "seed": n}) for n, prompt in enumerate(PROMPTS)]
    jobs += [(PROMPTS[1], {"repetition_penalty": 1.5})]  # changed logits; logprobs are raw
    for (prompt, _), output in zip(jobs, generate(engine, host, jobs), strict=True):
        prompt_ids = host.encode(prompt)
        generated = [token for token, _, _ in output.logprobs]
        expected = model_logprobs(host.model, prompt_ids + generated, len(prompt_ids))
        for step, (token, logprob, alternatives) in enumerate(output.logprobs):
            row = expected[len(prompt_ids) - 1 + step]
            assert logprob == pytest.approx(row[token].item(), **CLOSE)
            assert [a for a, _ in alternatives] == row.topk(2).indices.tolist()


def test_logprobs_leave_each_rows_tokens_as_they_are(engine, host):
    """Greedy rows take their tokens from the log-probabilities' best ones: the same tokens
    as without log-probabilities, a row whose EOS min_tokens masks and penalties included."""
    from workers.engine import GenerationRequest

    # Greedy, "The dog" ends at its 27th token (EOS) and "0 1 2 3" at its 35th.
    jobs = [(PROMPTS[0], {}), (PROMPTS[1], {"min_tokens": 30}), (PROMPTS[2], {})]
    jobs += [(PROMPTS[3], {}), (PROMPTS[0], {"repetition_penalty": 1.5})]

    def texts(logprobs: int | None) -> list[str]:
        futures = [
            engine.submit(
                GenerationRequest(
                    uuid.uuid4(),
                    host.encode(prompt),
                    SamplingParams(max_tokens=40, logprobs=logprobs, **settings),
                )
            )
            for prompt, settings in jobs
        ]
        return [future.result(timeout=60).text for future in futures]

    assert texts(3) == texts(None)


def test_a_row_with_every_token_masked_samples_without_failing_the_step():
    """A grammar at a dead end leaves no token; the row gets one (its matcher then fails that
    job alone) instead of an error that would fail the whole batch."""
    masked = torch.full((VOCAB,), float("-inf"))
    params = SamplingParams(max_tokens=1, temperature=1.0)
    assert 0 <= sample_token(masked, params, torch.Generator().manual_seed(0)) < VOCAB
