"""Ragged attention: a running batch whose cache is in several groups decodes as if it were one
padded cache, and a model that cannot run it keeps one cache."""

import uuid
from types import SimpleNamespace

import torch

from llmq.protocol import SamplingParams

PROMPTS = [
    ["Once upon a time there was a little", "The dog"],
    ["A queue holds jobs until a worker is ready and then it runs them all"],
    ["x", "Hello 🙂 漢字", "0 1 2 3 4 5"],
]
DECODE_STEPS = 6


def prefill(engine, host, prompts):
    """One group, as the engine makes it when these prompts join together."""
    params = SamplingParams(max_tokens=DECODE_STEPS + 1)
    seqs = [
        SimpleNamespace(
            request=SimpleNamespace(prompt_ids=host.encode(p), params=params, timed=False)
        )
        for p in prompts
    ]
    return engine._forward_prompts(seqs)


def test_several_groups_decode_as_one_padded_cache(host):
    from workers.engine import GenerationEngine

    assert host.ragged_attention
    engine = GenerationEngine(host, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=1)
    parts = [prefill(engine, host, prompts) for prompts in PROMPTS]
    one = parts[0].concat(parts[1], max_groups=1).concat(parts[2], max_groups=1)
    apart = {"max_groups": 3, "group_cost_cells": 0}  # however little a merge would pad
    ragged = parts[0].concat(parts[1], **apart).concat(parts[2], **apart)
    assert len(one.groups) == 1 and len(ragged.groups) == 3
    assert torch.equal(one.positions(), ragged.positions())
    for _ in range(DECODE_STEPS):  # each step appends to every group's cache in place
        next_ids = one.logits.argmax(-1, keepdim=True)
        assert torch.equal(next_ids, ragged.logits.argmax(-1, keepdim=True))
        one = engine._forward_step(one, next_ids)
        ragged = engine._forward_step(ragged, next_ids)
        torch.testing.assert_close(ragged.logits, one.logits, rtol=1e-4, atol=1e-4)
    # No group is padded to another's length.
    longest = [max(len(host.encode(p)) for p in prompts) for prompts in PROMPTS]
    assert [g.length for g in ragged.groups] == [n + 6 for n in longest]


def test_a_model_without_sdpa_attention_keeps_one_cache(host, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from llmq.protocol import SamplingParams
    from workers.engine import GenerationEngine, GenerationRequest
    from workers.host import ModelHost

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager")
    eager_host = ModelHost(host.spec, "cpu", eager.eval(), host.tokenizer, 0.0)
    assert not eager_host.ragged_attention
    engine = GenerationEngine(
        eager_host, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=1, max_cache_groups=4
    )
    assert engine.max_cache_groups == 1
    engine.start()
    try:
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        prompt = host.encode(PROMPTS[1][0])
        output = engine.submit(GenerationRequest(uuid.uuid4(), prompt, params))
        assert output.result(timeout=60).completion_tokens == 8
    finally:
        engine.stop()
