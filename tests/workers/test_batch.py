"""The running batch's KV cache: columns written in place, rows joined and left exactly."""

import torch

from workers.batch import ROOM, Batch, Group, GrowingLayer, length_groups


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


def test_a_prefill_for_short_jobs_leaves_only_the_room_they_need():
    layer = GrowingLayer(room=3)
    layer.update(states(2, 5), states(2, 5))
    assert layer.key_buffer.shape[2] == layer.value_buffer.shape[2] == 5 + 3
    for step in range(3):
        layer.update(states(2, 1, step), states(2, 1, step))
    assert layer.key_buffer.shape[2] == 8
    layer.update(states(2, 1), states(2, 1))  # past the room: grows as any other buffer
    assert layer.key_buffer.shape[2] == 9 + ROOM and layer.get_seq_length() == 9


def group(rows: int, length: int, start: float, room: int = ROOM) -> Group:
    layer = GrowingLayer(room=room)
    layer.update(states(rows, length, start), states(rows, length, start + 0.5))
    return Group([layer], torch.ones(rows, length, dtype=torch.long))


def batch(*groups: Group, first: int = 0) -> Batch:
    """Rows numbered from `first`, as their sequences and their logits."""
    rows = range(first, first + sum(g.rows for g in groups))
    return Batch(list(rows), list(groups), torch.tensor(rows).float()[:, None])


def test_a_merge_right_aligns_the_shorter_rows_with_zeros_and_a_leave_drops_padding():
    long, short = batch(group(1, 4, 0)), batch(group(2, 2, 100), first=1)
    joined = long.concat(short, max_groups=1)
    [merged] = joined.groups
    keys = merged.layers[0].keys
    assert keys.shape == (3, 2, 4, 3)
    assert torch.equal(keys[0], states(1, 4)[0])
    assert torch.equal(keys[1:, :, 2:], states(2, 2, 100))
    assert not keys[1:, :, :2].any()  # left padding holds zeros, never stale memory
    assert merged.mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert merged.layers[0].key_buffer.shape[2] == 4 + ROOM

    kept = joined.select([1, 2])  # the long row leaves: its extra columns go with it
    assert kept.seqs == [1, 2] and kept.groups[0].mask.tolist() == [[1, 1], [1, 1]]
    assert torch.equal(kept.groups[0].layers[0].keys, states(2, 2, 100))
    assert torch.equal(kept.groups[0].layers[0].values, states(2, 2, 100.5))
    assert kept.logits.flatten().tolist() == [1, 2]


def test_a_join_adds_a_group_and_a_leave_copies_only_the_groups_that_lose_rows():
    first, second, third = group(2, 6, 0), group(3, 3, 1000), group(1, 2, 2000)
    apart = {"max_groups": 4, "group_cost_cells": 0}  # however little a merge would pad
    joined = batch(first).concat(batch(second, first=2), **apart)
    joined = joined.concat(batch(third, first=5), **apart)
    assert all(a is b for a, b in zip(joined.groups, [first, second, third], strict=True))
    assert joined.positions().flatten().tolist() == [6, 6, 3, 3, 3, 2]

    kept = joined.select([0, 1, 3, 4])  # one row of the second group and the third group leave
    assert kept.seqs == [0, 1, 3, 4] and kept.logits.flatten().tolist() == [0, 1, 3, 4]
    assert kept.groups[0] is first
    assert len(kept.groups) == 2
    assert torch.equal(kept.groups[1].layers[0].keys, states(3, 3, 1000)[1:])


def test_past_the_limit_the_neighbouring_groups_that_pad_least_merge():
    groups = [group(2, 10, 0), group(2, 9, 1000), group(2, 3, 2000)]
    joined = batch(groups[0]).concat(batch(*groups[1:], first=2), max_groups=2, group_cost_cells=0)
    assert [(g.rows, g.length) for g in joined.groups] == [(4, 10), (2, 3)]
    assert joined.groups[1] is groups[2]
    assert joined.groups[0].mask[2:].tolist() == [[0] + [1] * 9] * 2


def test_groups_whose_merge_pads_less_than_a_groups_cost_merge_below_the_limit():
    # Rows that joined a few steps apart: 16 rows of 40 columns and 16 of 36 pad 64 cells as
    # one group; a group of 16 rows of 9 would pad 16 × 31 = 496 cells to join them.
    near, nearer, far = group(16, 40, 0), group(16, 36, 1e5), group(16, 9, 2e5)
    joined = batch(near).concat(batch(nearer, far, first=16), max_groups=4, group_cost_cells=400)
    assert [(g.rows, g.length) for g in joined.groups] == [(32, 40), (16, 9)]
    assert joined.groups[1] is far
    assert joined.groups[0].mask[16:].tolist() == [[0] * 4 + [1] * 36] * 16
    # With merges costing nothing less than a group, the limit alone merges.
    kept_apart = batch(near).concat(batch(nearer, far, first=16), max_groups=4, group_cost_cells=0)
    assert len(kept_apart.groups) == 3


def test_prompts_prefill_in_groups_of_similar_lengths_only_where_it_saves_padding():
    # Far apart: two groups, each padded to its own longest prompt.
    assert length_groups([5, 30, 5, 30, 5, 30] * 10, most=4) == [
        list(range(0, 60, 2)),
        list(range(1, 60, 2)),
    ]
    # Close together: a second pass costs more than the padding it saves.
    assert length_groups([10, 11, 12, 10], most=4) == [[0, 3, 1, 2]]
    assert length_groups([5, 300], most=1) == [[0, 1]]
    assert length_groups([7], most=4) == [[0]]
    # Every prompt in exactly one group, the groups in order of length.
    lengths = [(i * 37) % 50 + 1 for i in range(64)]
    groups = length_groups(lengths, most=3)
    assert sorted(i for g in groups for i in g) == list(range(64)) and len(groups) <= 3
    assert all(
        max(lengths[i] for i in a) <= min(lengths[i] for i in b)
        for a, b in zip(groups, groups[1:], strict=False)
    )


def test_rows_that_leave_or_merge_keep_their_groups_room_and_not_more():
    short, shorter = group(3, 4, 0, room=5), group(2, 6, 100, room=2)
    kept = batch(short).select([0, 2])
    assert kept.groups[0].layers[0].key_buffer.shape[2] == 4 + 5
    merged = batch(short).concat(batch(shorter, first=3), max_groups=1).groups[0]
    assert merged.layers[0].key_buffer.shape[2] == 6 + 5  # the roomier group's room
    full = group(2, 3, 0, room=0)  # rows still running always take one more column
    assert batch(full).select([1]).groups[0].layers[0].key_buffer.shape[2] == 3 + ROOM
