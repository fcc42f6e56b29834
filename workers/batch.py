"""The running batch: sequences that share one left-padded KV cache.

`concat` (join) and `select` (leave) follow TGI's CausalLMBatch.concatenate and filter: rows of
different lengths are aligned by padding on the left, and columns that are padding in every
remaining row are dropped when rows leave, so the cache never grows past the longest live row.

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

Row = TypeVar("Row")

# Free columns a buffer gets past its contents: a buffer is copied once per this many steps.
ROOM = 64


def _buffer(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """An uninitialised [rows, heads, columns, dim] buffer for tensors shaped like `like`."""
    return like.new_empty((rows, like.shape[1], columns, like.shape[3]))


class GrowingLayer(DynamicLayer):
    """One layer's cache: `keys` and `values` are views of the first `length` columns of
    buffers with room for more; `update` writes new columns in place, growing the buffers by
    ROOM columns only when they are full."""

    def __init__(
        self,
        key_buffer: torch.Tensor | None = None,
        value_buffer: torch.Tensor | None = None,
        length: int = 0,
    ) -> None:
        super().__init__()
        self.length = 0
        if key_buffer is not None and value_buffer is not None:
            self._use(key_buffer, value_buffer, length)

    def _use(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        self.key_buffer, self.value_buffer, self.length = key_buffer, value_buffer, length
        self.keys = key_buffer[:, :, :length]
        self.values = value_buffer[:, :, :length]
        self.device = key_buffer.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = key_states.shape[0], key_states.shape[2] + ROOM
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


def _stacked(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """The parts' rows one after another, each right-aligned to `length` columns (zeros on the
    left: padding must hold finite numbers, as masked attention still multiplies it by 0),
    in a buffer with ROOM free columns after them."""
    buffer = _buffer(parts[0], sum(p.shape[0] for p in parts), length + ROOM)
    row = 0
    for part in parts:
        rows, pad = part.shape[0], length - part.shape[2]
        buffer[row : row + rows, :, :pad] = 0
        buffer[row : row + rows, :, pad:length] = part
        row += rows
    return buffer


def _selected(used: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """`rows` of `used` from column `start` on, in a buffer with ROOM free columns after them."""
    length = used.shape[2] - start
    buffer = _buffer(used, len(rows), length + ROOM)
    torch.index_select(used[:, :, start:], 0, rows, out=buffer[:, :, :length])
    return buffer


@dataclass
class Batch(Generic[Row]):
    """Running sequences with their shared left-padded KV cache and next-token logits."""

    seqs: list[Row]
    layers: list[GrowingLayer]  # per model layer, [batch, heads, length, dim] of used columns
    mask: torch.Tensor  # [batch, length], 0 where a row is padded on the left
    logits: torch.Tensor  # [batch, vocab], for the token each row picks next

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def cache(self) -> Cache:
        """The cache for the next forward pass, which appends to these layers in place."""
        return Cache(layers=list(self.layers))

    def concat(self, other: "Batch[Row]") -> "Batch[Row]":
        length = max(self.length, other.length)
        layers = [
            GrowingLayer(
                _stacked([a.keys, b.keys], length), _stacked([a.values, b.values], length), length
            )
            for a, b in zip(self.layers, other.layers, strict=True)
        ]
        masks = [
            torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in (self.mask, other.mask)
        ]
        return Batch(
            self.seqs + other.seqs, layers, torch.cat(masks), torch.cat([self.logits, other.logits])
        )

    def select(self, rows: list[int]) -> "Batch[Row]":
        """Keep only `rows`, and drop left columns that are padding in every remaining row."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum().item())
        length = self.length - start
        layers = [
            GrowingLayer(
                _selected(layer.keys, index, start), _selected(layer.values, index, start), length
            )
            for layer in self.layers
        ]
        return Batch(
            [self.seqs[r] for r in rows],
            layers,
            mask[:, start:],
            self.logits.index_select(0, index),
        )
