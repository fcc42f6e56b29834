"""An engine process runs each kind of forward pass on its own number of torch threads."""

import pytest
import torch


def test_pass_threads_keep_a_core_for_decode_and_use_all_for_prompts(monkeypatch):
    from workers import engine_main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(engine_main, "_cores", lambda: 4)
    assert engine_main.pass_threads() == {"decode": 3, "prefill": 4, "score": 4}
    monkeypatch.setattr(engine_main, "_cores", lambda: 1)
    assert engine_main.pass_threads() == {"decode": 1, "prefill": 1, "score": 1}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the operator's choice stands
    assert engine_main.pass_threads() is None


@pytest.fixture
def host(tiny_model_path):
    from llmq.registry import ModelSpec
    from workers.host import ModelHost

    spec = ModelSpec(id="tiny-llama", source=str(tiny_model_path), context_length=512)
    return ModelHost.load(spec, "cpu", tiny_model_path.parent)


def test_each_pass_runs_on_the_threads_of_its_kind(host):
    before = torch.get_num_threads()
    ids = torch.tensor([host.encode("Once upon a time")])
    try:
        host.pass_threads = {"decode": 1, "score": 2}
        host.forward("score", input_ids=ids, use_cache=False)
        assert torch.get_num_threads() == 2
        host.forward("decode", input_ids=ids, use_cache=False)
        assert torch.get_num_threads() == 1
        host.forward("prefill", input_ids=ids, use_cache=False)  # not named: left as it is
        assert torch.get_num_threads() == 1
        host.pass_threads = None
        torch.set_num_threads(2)
        host.forward("decode", input_ids=ids, use_cache=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_small_pass_runs_on_the_decode_threads(host):
    before = torch.get_num_threads()
    small = torch.tensor([host.encode("Once upon a time")])
    large = small.repeat(4, 1)
    try:
        host.pass_threads = {"decode": 1, "prefill": 2, "score": 2}
        host.small_pass_tokens = large.numel()
        host.forward("prefill", input_ids=small, use_cache=False)
        assert torch.get_num_threads() == 1
        host.forward("score", input_ids=large, use_cache=False)  # not below the bound
        assert torch.get_num_threads() == 2
        host.forward("score", input_ids=small, use_cache=False)
        assert torch.get_num_threads() == 1
        host.small_pass_tokens = 0
        host.forward("prefill", input_ids=small, use_cache=False)
        assert torch.get_num_threads() == 2
    finally:
        host.pass_threads = None
        torch.set_num_threads(before)
