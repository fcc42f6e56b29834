"""Structured output in the engine: masks touch only constrained rows, compiled grammars are
kept per constraint, and a grammar that compiles too long fails its job alone."""

import re
import time
import uuid

import pytest
import torch

from llmq.constraints import OutputConstraint
from llmq.protocol import SamplingParams
from workers.constraints import ConstraintFailed, Constraints, mask_rows

DIGITS = OutputConstraint(kind="regex", value="[0-9]{3}")


@pytest.fixture
def constraints(host):
    return Constraints(host.tokenizer, host.model.get_output_embeddings().weight.shape[0])


def test_masks_touch_only_the_constrained_rows(host, constraints):
    matcher = constraints.matcher(DIGITS).result(timeout=30)
    logits = torch.randn(3, constraints.vocab_size)
    before = logits.clone()
    mask_rows(logits, [1], [matcher])
    torch.testing.assert_close(logits[[0, 2]], before[[0, 2]])
    allowed = (logits[1] > float("-inf")).nonzero().flatten().tolist()
    texts = [host.tokenizer.decode([token]) for token in allowed]
    assert texts and all(re.fullmatch("[0-9]+", text) for text in texts), texts


def test_a_compiled_grammar_is_kept_and_copied(constraints):
    first = constraints.matcher(DIGITS).result(timeout=30)
    again = constraints.matcher(DIGITS)
    assert again.done()  # from the cache, with no compile
    copy = again.result()
    assert copy is not first and len(constraints._compiled) == 1
    # A copy keeps its own state: advancing it leaves the kept grammar at its start.
    digit = next(t for t in range(constraints.vocab_size) if first.try_consume_tokens([t]) == 1)
    assert copy.consume_token(digit) and not copy.is_error()
    assert constraints.matcher(DIGITS).result().try_consume_tokens([digit]) == 1


def test_a_grammar_that_compiles_too_long_fails_its_job_alone(host, monkeypatch):
    import workers.engine as engine_module
    from workers.engine import GenerationEngine, GenerationRequest

    slow_compile = Constraints._compile

    def slowly(self, constraint):
        time.sleep(0.5)
        return slow_compile(self, constraint)

    monkeypatch.setattr(engine_module, "COMPILE_LIMIT_S", 0.1)
    monkeypatch.setattr(Constraints, "_compile", slowly)
    engine = GenerationEngine(host, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=5)
    engine.start()
    try:
        constrained = engine.submit(
            GenerationRequest(
                uuid.uuid4(), host.encode("x"), SamplingParams(max_tokens=8, constraint=DIGITS)
            )
        )
        plain = engine.submit(
            GenerationRequest(uuid.uuid4(), host.encode("x"), SamplingParams(max_tokens=8))
        )
        with pytest.raises(ConstraintFailed, match="did not compile within"):
            constrained.result(timeout=30)
        assert plain.result(timeout=30).completion_tokens >= 1
        time.sleep(0.6)  # the compile ends later; the failed job stays failed
        assert engine.active_job_ids() == []
    finally:
        engine.stop()
