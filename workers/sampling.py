"""Per-sequence token choice inside a shared batch: every job keeps its own sampling parameters.

A row's logits go through, in vLLM's order: logit_bias, the repetition penalty (Transformers'
definition, over the prompt and the generated tokens), the frequency and presence penalties
(OpenAI's definition, over the generated tokens), then temperature, min_p, top_k and top_p.
Rows that ask for none of these take the greedy argmax of the whole batch in one call; only the
others are worked on one by one, so jobs with plain settings pay nothing for the rest.

Log-probabilities are those of the model itself (log_softmax of its raw logits, before any of
the above), as vLLM reports them by default: what the model thinks, whatever the job did with it.
"""

import random
from dataclasses import dataclass

import torch

from llmq.protocol import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per job, so a seeded job samples the same tokens whatever its neighbours."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


@dataclass(frozen=True)
class History:
    """The tokens a row's penalties look at."""

    prompt_ids: list[int]
    generated: list[int]


def adjust_logits(scores: torch.Tensor, params: SamplingParams, history: History) -> torch.Tensor:
    """A row's float logits after logit_bias and the penalties (a new tensor)."""
    scores = scores.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        bias = torch.tensor(list(params.logit_bias.values()), dtype=scores.dtype)
        scores.index_add_(0, ids, bias)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*history.prompt_ids, *history.generated}), dtype=torch.long)
        picked = scores[seen]
        penalty = params.repetition_penalty
        scores[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    if (params.frequency_penalty or params.presence_penalty) and history.generated:
        counts = torch.bincount(
            torch.tensor(history.generated, dtype=torch.long), minlength=scores.numel()
        ).to(scores.dtype)[: scores.numel()]
        scores -= counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
    return scores


def sample_token(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row of float logits with temperature, min_p, top_k and top_p."""
    scores = scores / params.temperature
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
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
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    histories: list[History] | None = None,
) -> list[int]:
    """One next token per row: plain greedy rows in one argmax; rows that sample or adjust
    their logits (histories needed then) each on their own."""
    chosen = logits.argmax(dim=-1).tolist()
    own_rows = [row for row, p in enumerate(params) if not p.greedy or p.adjusts_logits]
    if own_rows:
        cpu_logits = logits[own_rows].float().cpu()
        for slot, row in enumerate(own_rows):
            scores, p = cpu_logits[slot], params[row]
            if p.adjusts_logits:
                assert histories is not None, "penalties need each row's tokens"
                scores = adjust_logits(scores, p, histories[row])
            chosen[row] = (
                int(scores.argmax()) if p.greedy else sample_token(scores, p, generators[row])
            )
    return chosen


# What a log-probability of minus infinity (a token the model rules out) is reported as, as
# vLLM does: JSON has no infinity.
LOWEST_LOGPROB = -9999.0
# A token's log-probability and its best alternatives: (token id, logprob, ((id, logprob), ...)).
TokenLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its `tops[row]` likeliest tokens, best
    first, from the rows' raw logits (one log_softmax and one topk for all of them)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOWEST_LOGPROB)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(-1))
    most = max(tops, default=0)
    best_values: list[list[float]] = [[] for _ in tokens]
    best_ids: list[list[int]] = [[] for _ in tokens]
    if most:
        best = logprobs.topk(most, dim=-1)
        best_values, best_ids = best.values.tolist(), best.indices.tolist()
    return [
        (token, logprob, tuple(zip(ids[:top], values[:top], strict=True)))
        for token, logprob, ids, values, top in zip(
            tokens, chosen.squeeze(-1).tolist(), best_ids, best_values, tops, strict=True
        )
    ]
