"""Scoring on the real tiny model: batched log-likelihoods equal a direct computation with torch,
one (prompt, continuation) at a time, as lm-eval's Hugging Face backend makes it."""

import uuid

import pytest
import torch

from llmq.protocol import SamplingParams

PAIRS = [
    ("Once upon a time there was", " a little girl"),
    ("The quick brown fox jumps over the lazy dog. The dog", " was not happy"),
    ("Question: 2 + 2?\nAnswer:", " A"),
    ("Question: 2 + 2?\nAnswer:", " B"),
    ("Question: 2 + 2?\nAnswer: ", "C"),  # the space moves to the continuation
    ("x", " 漢字 🙂"),
]


@pytest.fixture(scope="module")
def host(tiny_model_path):
    from llmq.registry import ModelSpec
    from workers.host import ModelHost

    spec = ModelSpec(id="tiny-llama", source=str(tiny_model_path), context_length=512)
    return ModelHost.load(spec, "cpu", tiny_model_path.parent)


def direct(host, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """One row, no batch: log-softmax at each continuation token, summed."""
    tokenizer = host.tokenizer
    if context.endswith(" "):
        context, continuation = context[:-1], " " + continuation
    whole = tokenizer(context + continuation).input_ids
    continuation_ids = whole[len(tokenizer(context).input_ids) :]
    row = whole[-(max_length + 1) :][:-1]
    with torch.inference_mode():
        logits = host.model(input_ids=torch.tensor([row])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)[-len(continuation_ids) :]
    picked = [logprobs[i, token].item() for i, token in enumerate(continuation_ids)]
    greedy = logprobs.argmax(-1).tolist() == continuation_ids
    return sum(picked), greedy


def score_all(host, pairs, max_length: int, max_batch_tokens: int = 100_000):
    from workers.pairs import PairEncoder
    from workers.scoring import PendingScore, Scorer, ScoreRequest

    encoder = PairEncoder(host.tokenizer)
    pending = [
        PendingScore(ScoreRequest(uuid.uuid4(), [encoder.pair(c, x)], max_length)) for c, x in pairs
    ]
    with torch.inference_mode():
        Scorer(host, max_batch_tokens).run(pending)
    return [p.future.result() for p in pending]


@pytest.mark.parametrize("max_length", [512, 14])
def test_batched_scores_equal_direct_computation(host, max_length):
    outputs = score_all(host, PAIRS, max_length)
    for (context, continuation), output in zip(PAIRS, outputs, strict=True):
        expected, greedy = direct(host, context, continuation, max_length)
        assert output.loglikelihoods[0] == pytest.approx(expected, abs=1e-4)
        assert output.greedy == [greedy]


def test_small_token_budget_splits_passes_without_changing_scores(host):
    together = score_all(host, PAIRS, 512)
    apart = score_all(host, PAIRS, 512, max_batch_tokens=8)
    for a, b in zip(together, apart, strict=True):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, rel=1e-6)


def test_choices_sharing_a_prompt_share_one_row(host):
    from workers.pairs import PairEncoder
    from workers.scoring import PendingScore, Scorer, ScoreRequest

    encoder = PairEncoder(host.tokenizer)
    prompt = "Question: 2 + 2?\nAnswer:"
    pairs = [encoder.pair(prompt, c) for c in (" A", " B", " C", " D")]
    one_token = [p for p in pairs if len(p[1]) == 1]
    pending = PendingScore(ScoreRequest(uuid.uuid4(), pairs, 512))
    with torch.inference_mode():
        Scorer(host, 100_000).run([pending])
    output = pending.future.result()
    rows = {tuple(c + x[:-1]) for c, x in pairs}
    assert output.input_tokens == sum(len(row) for row in rows)
    if len(one_token) > 1:  # every one-token choice reads the same row: the prompt
        assert len(rows) < len(pairs)


def test_empty_prompt_is_scored_after_the_bos_token(host):
    from workers.pairs import PairEncoder

    encoder = PairEncoder(host.tokenizer)
    context, continuation = encoder.pair("", "Hello")
    assert context == [host.tokenizer.bos_token_id]
    assert continuation == host.tokenizer("Hello", add_special_tokens=False).input_ids


def test_engine_scores_between_decode_steps(host):
    """Scoring jobs submitted while generations decode all finish, and neither changes the
    other's result."""
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.pairs import PairEncoder
    from workers.scoring import ScoreRequest

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = ["Once upon a time", "The dog", "A queue holds jobs"]
    encoder = PairEncoder(host.tokenizer)
    engine = GenerationEngine(host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5)
    engine.start()
    try:
        alone = [
            engine.submit(GenerationRequest(uuid.uuid4(), host.encode(p), params)).result(60)
            for p in prompts
        ]
        generations = [
            engine.submit(GenerationRequest(uuid.uuid4(), host.encode(p), params)) for p in prompts
        ]
        scores = [
            engine.submit_score(ScoreRequest(uuid.uuid4(), [encoder.pair(c, x)], 512))
            for c, x in PAIRS
        ]
        mixed = [f.result(60) for f in generations]
        scored = [f.result(60) for f in scores]
    finally:
        engine.stop()
    assert [o.text for o in mixed] == [o.text for o in alone]
    for (context, continuation), output in zip(PAIRS, scored, strict=True):
        assert output.loglikelihoods[0] == pytest.approx(
            direct(host, context, continuation, 512)[0], abs=1e-4
        )


def test_interactive_scoring_job_goes_before_waiting_evaluation_items(host):
    """Evaluation items score in background turns of about max_score_tokens each; a scoring
    job of an interactive client waits for none of them."""
    from llmq.protocol import BATCH_PRIORITY
    from workers.engine import GenerationEngine
    from workers.pairs import PairEncoder
    from workers.scoring import ScoreRequest

    encoder = PairEncoder(host.tokenizer)
    engine = GenerationEngine(
        host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5, max_score_tokens=64
    )
    finished: list[str] = []
    futures = []
    # Everything is submitted before the engine starts, so its first cycle sees all of it.
    for i in range(12):
        pair = encoder.pair(f"Question {i}: what comes next?\nAnswer:", " A")
        item = ScoreRequest(uuid.uuid4(), [pair], 512, priority=BATCH_PRIORITY)
        futures.append((f"item {i}", engine.submit_score(item)))
    mine = ScoreRequest(uuid.uuid4(), [encoder.pair("Once upon a time", " there")], 512)
    futures.append(("interactive", engine.submit_score(mine)))
    for name, future in futures:
        future.add_done_callback(lambda _f, name=name: finished.append(name))
    engine.start()
    try:
        for _, future in futures:
            future.result(60)
    finally:
        engine.stop()
    assert finished[0] == "interactive", finished
    assert sorted(finished[1:]) == sorted(f"item {i}" for i in range(12))


def test_pairs_of_one_prompt_equal_lm_evals_pairs(host):
    """The prompt is encoded once for all its continuations; each pair is still the one lm-eval
    makes: the prompt without its trailing whitespace, and the tokens past it in the encoding
    of the whole text."""
    from workers.pairs import PairEncoder

    tokenizer = host.tokenizer
    encoder = PairEncoder(tokenizer)
    for prompt in ("Question: 2 + 2?\nAnswer:", "Question: 2 + 2?\nAnswer: ", "x"):
        continuations = [" A", " B", "C", " 漢字 🙂"]
        context = prompt.rstrip()
        moved = prompt[len(context) :]
        expected_context = tokenizer(context).input_ids
        expected = [
            (expected_context, tokenizer(context + moved + c).input_ids[len(expected_context) :])
            for c in continuations
        ]
        assert encoder.pairs(prompt, continuations) == expected


def test_engine_times_its_forward_passes_by_kind(host):
    """llmq_forward_pass_seconds: a prefill and decode steps for a generation, one scoring
    pass for a scoring request."""
    from prometheus_client import REGISTRY

    from workers.engine import GenerationEngine, GenerationRequest
    from workers.pairs import PairEncoder
    from workers.scoring import ScoreRequest

    labels = {"model": host.spec.id, "queue": host.spec.queue(host.device)}

    def passes(kind: str) -> float:
        name = "llmq_forward_pass_seconds_count"
        return REGISTRY.get_sample_value(name, labels | {"kind": kind}) or 0.0

    before = {kind: passes(kind) for kind in ("prefill", "decode", "score")}
    engine = GenerationEngine(host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5)
    engine.start()
    try:
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        engine.submit(GenerationRequest(uuid.uuid4(), host.encode("The dog"), params)).result(60)
        pair = PairEncoder(host.tokenizer).pair("Once upon a time", " there")
        engine.submit_score(ScoreRequest(uuid.uuid4(), [pair], 512)).result(60)
    finally:
        engine.stop()
    # The first token comes from the prefill; each later one from a decode pass.
    assert passes("prefill") - before["prefill"] == 1
    assert passes("decode") - before["decode"] == 5
    assert passes("score") - before["score"] == 1


def test_evaluation_items_score_longest_row_first(host):
    """Background scoring turns take the longest waiting rows first, as lm-eval orders its
    requests, so that a pass pads its rows less; interactive scoring jobs keep their order."""
    from llmq.protocol import BATCH_PRIORITY
    from workers.engine import GenerationEngine
    from workers.pairs import PairEncoder
    from workers.scoring import ScoreRequest

    encoder = PairEncoder(host.tokenizer)
    engine = GenerationEngine(
        host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5, max_score_tokens=64
    )
    finished: list[int] = []
    futures = []
    for words in (3, 9, 1, 6, 12, 4):  # one item per turn: each is over half of 64 tokens
        prompt = "Question: " + " ".join(["what"] * (30 + words)) + "?\nAnswer:"
        pairs = [encoder.pair(prompt, " A")]
        item = ScoreRequest(uuid.uuid4(), pairs, 512, priority=BATCH_PRIORITY)
        future = engine.submit_score(item)
        future.add_done_callback(lambda _f, words=words: finished.append(words))
        futures.append(future)
    engine.start()
    try:
        for future in futures:
            future.result(60)
    finally:
        engine.stop()
    assert finished == [12, 9, 6, 4, 3, 1]


def test_background_turns_stay_short_while_interactive_traffic_goes_on(host, monkeypatch):
    """Between one interactive job and the next, the background lane runs alone, in turns of
    about _BACKGROUND_TURN_S, so the next job waits little; a second after the last interactive
    job, background turns grow to _IDLE_BACKGROUND_TURN_S."""
    from workers import engine as engine_module
    from workers.engine import GenerationEngine, GenerationRequest

    engine = GenerationEngine(host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5)
    engine._score_s_per_token = 1e-4  # as measured after some scoring
    short = int(engine_module._BACKGROUND_TURN_S / 1e-4)
    long = int(engine_module._IDLE_BACKGROUND_TURN_S / 1e-4)
    assert engine._score_budget(background=True) == long
    engine.start()
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        job = GenerationRequest(uuid.uuid4(), host.encode("The dog"), params)
        engine.submit(job).result(60)
    finally:
        engine.stop()
    assert engine._score_budget(background=True) == short
    later = engine_module.time.monotonic() + engine_module._INTERACTIVE_RECENT_S + 0.1
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: later)
    assert engine._score_budget(background=True) == long
    assert engine._score_budget(background=False) == engine.max_score_tokens
