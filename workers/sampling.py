"""Per-sequence token choice inside a shared batch: every job keeps its own sampling parameters."""

import random

import torch

from llmq.protocol import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per job, so a seeded job samples the same tokens whatever its neighbours."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row of logits with temperature, top-k and top-p."""
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int]:
    """One next token per row: greedy rows in one argmax, sampled rows each with their generator."""
    greedy_choice = logits.argmax(dim=-1).tolist()
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        cpu_logits = logits[sampled_rows].float().cpu()
        for slot, row in enumerate(sampled_rows):
            greedy_choice[row] = sample_token(cpu_logits[slot], params[row], generators[row])
    return greedy_choice
