"""The running batch's KV cache: columns written in place, rows joined and left exactly."""

import torch

from workers.batch import ROOM, Batch, GrowingLayer


def states(rows: int, length: int, start: float = 0.0) -> torch.Tensor:
    count = rows * 2 * length * 3
    return torch.arange(start, start + count).reshape(rows, 2, length, 3)


def test_update_appends_in_place_until_the_buffer_is_full():
    layer = GrowingLayer()
    keys, _ = layer.update(states(2, 5), states(2, 5, 1000))
    buffer = layer.key_buffer
    assert buffer.shape[2] == 5 + ROOM
    expected = states(2, 5)
    for step in range(ROOM):
        new = states(2, 1, 10_000 + step)
        keys, values = layer.update(new, new + 1)
        expected = torch.cat([expected, new], dim=2)
        assert layer.key_buffer is buffer  # written in place, nothing copied
    assert torch.equal(keys, expected) and torch.equal(values[:, :, 5:], expected[:, :, 5:] + 1)
    grown = states(2, 1, 99_999)
    keys, _ = layer.update(grown, grown)
    assert layer.key_buffer is not buffer and layer.key_buffer.shape[2] == 6 + 2 * ROOM
    assert torch.equal(keys, torch.cat([expected, grown], dim=2))
    assert layer.get_seq_length() == 5 + ROOM + 1


def batch(rows: int, length: int, start: float) -> Batch:
    layer = GrowingLayer()
    layer.update(states(rows, length, start), states(rows, length, start + 0.5))
    mask = torch.ones(rows, length, dtype=torch.long)
    return Batch(list(range(rows)), [layer], mask, torch.zeros(rows, 4))


def test_concat_right_aligns_the_shorter_batch_with_zeros_and_select_drops_padding():
    long, short = batch(1, 4, 0), batch(2, 2, 100)
    joined = long.concat(short)
    keys = joined.layers[0].keys
    assert keys.shape == (3, 2, 4, 3)
    assert torch.equal(keys[0], states(1, 4)[0])
    assert torch.equal(keys[1:, :, 2:], states(2, 2, 100))
    assert not keys[1:, :, :2].any()  # left padding holds zeros, never stale memory
    assert joined.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert joined.layers[0].key_buffer.shape[2] == 4 + ROOM

    kept = joined.select([2, 1])  # the long row leaves: its extra columns go with it
    assert kept.seqs == [1, 0] and kept.mask.tolist() == [[1, 1], [1, 1]]
    assert torch.equal(kept.layers[0].keys, states(2, 2, 100).flip(0))
    assert torch.equal(kept.layers[0].values, states(2, 2, 100.5).flip(0))
