"""Attention over a running batch whose rows keep their KV caches in several groups.

Rows that joined the running batch together share one left-padded cache: a group
(workers/batch.py). Were all rows in one cache, a row that joined late would attend over the
columns of the batch's oldest row, padding that the mask then discards, and every join or leave
would copy the whole cache. With a group per join, a decode step runs the model's other layers
over all rows at once and its attention group by group, each over its own columns.

The model's attention implementation becomes `llmq_ragged`: Transformers' SDPA attention, run
once per group when the cache hands it a `RaggedKV`, and unchanged otherwise (prefill, scoring,
a batch of one group).
"""

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

RAGGED = "llmq_ragged"


@dataclass(frozen=True)
class RaggedKV:
    """One layer's keys and values, group by group, as the attention function receives them."""

    keys: list[torch.Tensor]  # per group, [rows, heads, columns, dim]
    values: list[torch.Tensor]
    bounds: list[tuple[int, int]]  # per group, its rows in the batch: [start, end)
    masks: list[torch.Tensor | None]  # per group, [rows, 1, 1, columns]; None: no padding


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    if not isinstance(key, RaggedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[start:end], keys, values, mask, **kwargs)[0]
        for keys, values, (start, end), mask in zip(
            key.keys, key.values, key.bounds, key.masks, strict=True
        )
    ]
    return torch.cat(outputs), None


AttentionInterface.register(RAGGED, ragged_attention)
# Prefill and scoring passes build their masks as for SDPA.
AttentionMaskInterface.register(RAGGED, sdpa_mask)


def enable_ragged_attention(model: PreTrainedModel) -> bool:
    """Switch a model that runs SDPA attention to ragged attention; False if it cannot (other
    attention, or a model that does not call attention through Transformers' interface)."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(RAGGED)
    return model.config._attn_implementation == RAGGED


class RaggedLayer(DynamicLayer):
    """One model layer's cache across groups: `update` appends each group's rows of the new
    keys and values to that group's layer, and returns them all as one RaggedKV."""

    def __init__(self, parts, bounds: list[tuple[int, int]], masks) -> None:
        super().__init__()
        self.parts = parts  # per group, a workers.batch.GrowingLayer
        self.bounds = bounds
        self.masks = masks
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = [], []
        for part, (start, end) in zip(self.parts, self.bounds, strict=True):
            group_keys, group_values = part.update(key_states[start:end], value_states[start:end])
            keys.append(group_keys)
            values.append(group_values)
        ragged = RaggedKV(keys, values, self.bounds, self.masks)
        return ragged, ragged

    def get_seq_length(self) -> int:
        return max(part.length for part in self.parts)


def ragged_cache(group_layers, group_masks: list[torch.Tensor]) -> Cache:
    """A cache over groups for one decode step. `group_layers[g][i]` is model layer i's cache of
    group g; `group_masks[g]` is its [rows, columns] mask including this step's column."""
    bounds, start = [], 0
    for mask in group_masks:
        bounds.append((start, start + mask.shape[0]))
        start += mask.shape[0]
    masks = [None if bool(m.all()) else m.bool()[:, None, None, :] for m in group_masks]
    layers = [RaggedLayer(list(parts), bounds, masks) for parts in zip(*group_layers, strict=True)]
    return Cache(layers=layers)
