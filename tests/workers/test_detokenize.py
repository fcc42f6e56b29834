"""Incremental detokenization on the real tiny tokenizer."""

import pytest

from workers.detokenize import TextState, advance_texts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def stream(
    tokenizer, ids: list[int], stops: list[str] | None = None
) -> tuple[list[str], TextState]:
    state = TextState(stops=stops or [])
    backend = tokenizer.backend_tokenizer

    def decode_batch(seqs):
        return backend.decode_batch(seqs, skip_special_tokens=True)

    deltas = []
    for n in range(1, len(ids) + 1):
        advance_texts(decode_batch, [(state, ids[:n])])
        if state.stopped:
            break
        deltas.append(state.take_delta(final=False))
    state.finish(backend.decode(ids[:n], skip_special_tokens=True))
    deltas.append(state.take_delta(final=True))
    return [d for d in deltas if d], state


def test_multibyte_characters_split_across_tokens_arrive_whole(tokenizer):
    text = "漢字 and 🙂 Ünïcödé"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split()), "the characters must span several tokens"
    assert len(tokenizer("漢", add_special_tokens=False).input_ids) > 1, "漢 must be split"
    deltas, state = stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == state.text
    # 漢 arrives in one delta, whole, although its bytes came in separate tokens.
    assert any("漢" in d for d in deltas)


def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    deltas, state = stream(tokenizer, ids, stops=["fox jum"])
    assert state.stopped
    assert "".join(deltas) == "The quick brown "
    assert all("fox" not in d for d in deltas)


def test_nul_bytes_become_the_null_symbol(tokenizer):
    ids = tokenizer("a\u0000b", add_special_tokens=False).input_ids
    deltas, state = stream(tokenizer, ids)
    assert state.text == "a\u2400b" == "".join(deltas)
