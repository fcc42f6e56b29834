"""The running batch: sequences that share one left-padded KV cache.

`concat` (join) and `select` (leave) follow TGI's CausalLMBatch.concatenate and filter: rows of
different lengths are aligned by padding on the left, and columns that are padding in every
remaining row are dropped when rows leave, so the cache never grows past the longest live row.
"""

from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache

Row = TypeVar("Row")


@dataclass
class Batch(Generic[Row]):
    """Running sequences with their shared left-padded KV cache and next-token logits."""

    seqs: list[Row]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [batch, heads, length, dim]
    mask: torch.Tensor  # [batch, length], 0 where a row is padded on the left
    logits: torch.Tensor  # [batch, vocab], for the token each row picks next

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def padded_to(self, length: int) -> "Batch[Row]":
        extra = length - self.length
        if extra == 0:
            return self
        kv = [
            (
                torch.nn.functional.pad(k, (0, 0, extra, 0)),
                torch.nn.functional.pad(v, (0, 0, extra, 0)),
            )
            for k, v in self.kv
        ]
        return Batch(self.seqs, kv, torch.nn.functional.pad(self.mask, (extra, 0)), self.logits)

    def concat(self, other: "Batch[Row]") -> "Batch[Row]":
        length = max(self.length, other.length)
        a, b = self.padded_to(length), other.padded_to(length)
        kv = [
            (torch.cat([ka, kb]), torch.cat([va, vb]))
            for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
        ]
        return Batch(
            a.seqs + b.seqs, kv, torch.cat([a.mask, b.mask]), torch.cat([a.logits, b.logits])
        )

    def select(self, rows: list[int]) -> "Batch[Row]":
        """Keep only `rows`, and drop left columns that are padding in every remaining row."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum().item())
        kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.kv
        ]
        return Batch(
            [self.seqs[r] for r in rows], kv, mask[:, start:], self.logits.index_select(0, index)
        )


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]
