"""The running batch: sequences whose KV caches are kept in groups of left-padded rows.

Rows that join together (one prefill) form a group. A join adds a group and a leave copies only
the groups that lose rows; a decode step attends group by group (workers/ragged.py), so a row
never attends over another group's longer past. When the groups exceed the engine's limit, or
when two neighbours' merge would pad less than keeping them apart costs (an attention call per
layer and step, GROUP_COST_VALUES), the two whose lengths are closest merge: within a group,
merging and leaving follow TGI's CausalLMBatch.concatenate and filter (rows of different lengths
aligned by padding on the left; columns that are padding in every remaining row dropped when
rows leave).

Each layer's keys and values live in buffers with free columns after the used ones
(`GrowingLayer`), so a decode step writes its one new column in place. Transformers'
DynamicCache concatenates the whole cache at every step instead (twice, when rebuilt from
tensors); on a CPU those copies cost more than the rest of the step.
"""

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from workers.ragged import ragged_cache

Row = TypeVar("Row")

# Free columns a buffer gets past its contents: a buffer is copied once per this many steps.
ROOM = 64


def _buffer(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """An uninitialised [rows, heads, columns, dim] buffer for tensors shaped like `like`."""
    return like.new_empty((rows, like.shape[1], columns, like.shape[3]))


class GrowingLayer(DynamicLayer):
    """One layer's cache: `keys` and `values` are views of the first `length` columns of
    buffers with room for more; `update` writes new columns in place, growing the buffers by
    ROOM columns only when they are full. A prefill's buffers get `room` free columns: rows that
    will take fewer new tokens than ROOM need no more (for a batch of short jobs, ROOM columns
    would double the cache). Rows never need more columns than their group has free, so a
    group that loses rows or merges keeps that room (`free`) instead of taking ROOM again."""

    def __init__(
        self,
        key_buffer: torch.Tensor | None = None,
        value_buffer: torch.Tensor | None = None,
        length: int = 0,
        room: int = ROOM,
    ) -> None:
        super().__init__()
        self.length = 0
        self.room = room
        if key_buffer is not None and value_buffer is not None:
            self._use(key_buffer, value_buffer, length)

    def _use(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.keys = key_buffer[:, :, :length]
        self.values = value_buffer[:, :, :length]
        self.device = key_buffer.device
        self.is_initialized = True

    @property
    def free(self) -> int:
        """Columns left after the used ones before the buffers must grow."""
        return self.key_buffer.shape[2] - self.length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = key_states.shape[0], key_states.shape[2] + self.room
        self._use(_buffer(key_states, rows, columns), _buffer(value_states, rows, columns), 0)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.key_buffer.shape[2]:
            self._use(_with_room(self.keys, end), _with_room(self.values, end), self.length)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self._use(self.key_buffer, self.value_buffer, end)
        return self.keys, self.values


def _with_room(used: torch.Tensor, needed: int) -> torch.Tensor:
    """A copy of `used` in a buffer of `needed` + ROOM columns."""
    buffer = _buffer(used, used.shape[0], needed + ROOM)
    buffer[:, :, : used.shape[2]] = used
    return buffer


def _stacked(parts: list[torch.Tensor], length: int, room: int) -> torch.Tensor:
    """The parts' rows one after another, each right-aligned to `length` columns (zeros on the
    left: padding must hold finite numbers, as masked attention still multiplies it by 0),
    in a buffer with `room` free columns after them."""
    buffer = _buffer(parts[0], sum(p.shape[0] for p in parts), length + room)
    row = 0
    for part in parts:
        rows, pad = part.shape[0], length - part.shape[2]
        buffer[row : row + rows, :, :pad] = 0
        buffer[row : row + rows, :, pad:length] = part
        row += rows
    return buffer


def _selected(used: torch.Tensor, rows: torch.Tensor, start: int, room: int) -> torch.Tensor:
    """`rows` of `used` from column `start` on, in a buffer with `room` free columns after them."""
    length = used.shape[2] - start
    buffer = _buffer(used, len(rows), length + room)
    torch.index_select(used[:, :, start:], 0, rows, out=buffer[:, :, :length])
    return buffer


# A forward pass costs about as much as this many more prompt tokens: its fixed part (reading
# the weights, running its operations), which splitting a prefill pays once per group.
PASS_COST_TOKENS = 64


def length_groups(lengths: list[int], most: int) -> list[list[int]]:
    """The prompts (indices into `lengths`) in at most `most` groups of similar lengths, for
    prefills that each pad to their own longest prompt: the split minimises padded tokens plus
    PASS_COST_TOKENS per group (exactly, over the prompts sorted by length)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    count = len(order)
    if most <= 1 or count <= 1 or lengths[order[0]] == lengths[order[-1]]:
        return [order]
    # cost[k][j]: the least cost of the j shortest prompts in k groups; start[k][j]: where the
    # last of those groups starts.
    cost = [[float("inf")] * (count + 1) for _ in range(most + 1)]
    start = [[0] * (count + 1) for _ in range(most + 1)]
    cost[0][0] = 0
    for k in range(1, most + 1):
        for j in range(k, count + 1):
            longest = lengths[order[j - 1]]
            for i in range(k - 1, j):
                total = cost[k - 1][i] + (j - i) * longest + PASS_COST_TOKENS
                if total < cost[k][j]:
                    cost[k][j], start[k][j] = total, i
    k = min(range(1, most + 1), key=lambda groups: cost[groups][count])
    groups, end = [], count
    while k > 0:
        begin = start[k][end]
        groups.append(order[begin:end])
        end, k = begin, k - 1
    return groups[::-1]


@dataclass
class Group:
    """Rows that joined the running batch together, with their own left-padded KV cache."""

    layers: list[GrowingLayer]  # per model layer, [rows, heads, length, dim] of used columns
    mask: torch.Tensor  # [rows, length], 0 where a row is padded on the left

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def room(self) -> int:
        """Free columns for the rows' next tokens; at least one, as every row left takes one."""
        return self.layers[0].free or ROOM

    @classmethod
    def stacked(cls, groups: "list[Group]") -> "Group":
        """One group of all the groups' rows, right-aligned to the longest."""
        length = max(g.length for g in groups)
        room = max(g.room for g in groups)
        layers = [
            GrowingLayer(
                _stacked([layer.keys for layer in parts], length, room),
                _stacked([layer.values for layer in parts], length, room),
                length,
            )
            for parts in zip(*(g.layers for g in groups), strict=True)
        ]
        masks = [torch.nn.functional.pad(g.mask, (length - g.length, 0)) for g in groups]
        return cls(layers, torch.cat(masks))

    def select(self, rows: list[int]) -> "Group":
        """Only `rows`, without the left columns that are padding in every one of them."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum().item())
        room = self.room
        layers = [
            GrowingLayer(
                _selected(layer.keys, index, start, room),
                _selected(layer.values, index, start, room),
                self.length - start,
            )
            for layer in self.layers
        ]
        return Group(layers, mask[:, start:])

    def extended(self) -> "Group":
        """The mask with one more column, for the token a decode step appends to every row."""
        ones = self.mask.new_ones((self.rows, 1))
        return Group(self.layers, torch.cat([self.mask, ones], dim=-1))


# A cache group kept apart costs one more attention call per model layer and decode step. On a
# CPU that call's fixed part costs about as much as attending over this many more padded values
# (cells, rows × columns, times the model's hidden size): 512 cells of stories260K (64 wide), 64
# of a 512-wide model. Neighbouring groups whose merge pads less merge (group_cost_cells).
GROUP_COST_VALUES = 32_768


def group_cost_cells(hidden_size: int) -> int:
    """Padding cells that cost a model of this width about what one more cache group costs (0
    for an unknown width: groups then merge only past their limit)."""
    return GROUP_COST_VALUES // hidden_size if hidden_size > 0 else 0


def merge_padding(a: Group, b: Group) -> int:
    """Padding cells that stacking two groups into one adds."""
    length = max(a.length, b.length)
    return a.rows * (length - a.length) + b.rows * (length - b.length)


@dataclass
class Batch(Generic[Row]):
    """Running sequences, their KV caches in groups (rows in the same order as `seqs`), and
    their next-token logits."""

    seqs: list[Row]
    groups: list[Group]
    logits: torch.Tensor  # [batch, vocab], for the token each row picks next

    def positions(self) -> torch.Tensor:
        """[batch, 1]: each row's position for the token it appends next."""
        return torch.cat([g.mask.sum(-1, keepdim=True) for g in self.groups])

    def extended(self) -> "Batch[Row]":
        return Batch(self.seqs, [g.extended() for g in self.groups], self.logits)

    def attention_inputs(self) -> tuple[torch.Tensor | None, Cache]:
        """The decode pass's mask and cache (which appends to the groups' layers in place):
        one group runs the model's own attention; several run ragged attention."""
        if len(self.groups) == 1:
            group = self.groups[0]
            return group.mask, Cache(layers=list(group.layers))
        cache = ragged_cache([g.layers for g in self.groups], [g.mask for g in self.groups])
        return None, cache

    def concat(
        self, other: "Batch[Row]", max_groups: int, group_cost_cells: int = 0
    ) -> "Batch[Row]":
        """Both batches' rows; their groups stay apart, except that the neighbouring two whose
        merge pads least become one while there are more than `max_groups`, or while that merge
        pads fewer than `group_cost_cells` cells (what keeping them apart would cost)."""
        groups = self.groups + other.groups
        while len(groups) > 1:
            padding, pair = min(
                (merge_padding(*groups[i : i + 2]), i) for i in range(len(groups) - 1)
            )
            if len(groups) <= max_groups and padding >= group_cost_cells:
                break
            groups[pair : pair + 2] = [Group.stacked(groups[pair : pair + 2])]
        return Batch(self.seqs + other.seqs, groups, torch.cat([self.logits, other.logits]))

    def select(self, rows: list[int]) -> "Batch[Row]":
        """Keep only `rows` (in order); a group copies its cache only if it loses rows."""
        groups, start = [], 0
        for group in self.groups:
            kept = [r - start for r in rows if start <= r < start + group.rows]
            if len(kept) == group.rows:
                groups.append(group)
            elif kept:
                groups.append(group.select(kept))
            start += group.rows
        index = torch.tensor(rows, device=self.logits.device)
        return Batch([self.seqs[r] for r in rows], groups, self.logits.index_select(0, index))
