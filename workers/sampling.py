"""Per-sequence token choice inside a shared batch: every job keeps its own sampling parameters.

A row's logits go through, in vLLM's order: logit_bias, the repetition penalty (Transformers'
definition, over the prompt and the generated tokens), the frequency and presence penalties
(OpenAI's definition, over the generated tokens), then temperature, min_p, top_k and top_p.
Rows that ask for none of these take the greedy argmax of the whole batch in one call; rows with
a bias or a penalty are adjusted together in one pass; only sampled rows draw one by one, so jobs
with plain settings pay nothing for the rest.

Log-probabilities are those of the model itself (log_softmax of its raw logits, before any of
the above), as vLLM reports them by default: what the model thinks, whatever the job did with it.
The top-k taken for them also gives the greedy rows' tokens, so a step whose greedy rows all
ask for log-probabilities runs no argmax.
"""

import random

import torch

from llmq.protocol import SamplingParams
from workers.engine_jobs import TokenLogprob


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator per job, so a seeded job samples the same tokens whatever its neighbours."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


class TokenHistory:
    """The tokens a row's penalties read, kept token by token: which tokens the prompt and the
    output hold (repetition) and how often each was generated (frequency, presence). Kept up to
    date as the row goes, so no step rebuilds them from the whole prompt."""

    def __init__(self, prompt_ids: list[int], vocab_size: int) -> None:
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[[token for token in prompt_ids if token < vocab_size]] = True
        self.counts = torch.zeros(vocab_size)

    def add(self, token: int) -> None:
        if token < self.counts.numel():
            self.seen[token] = True
            self.counts[token] += 1


def adjust_logits(
    scores: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    """Rows of float logits after logit_bias and the penalties, all rows at once (a new
    tensor; a row whose setting is neutral is left as it was)."""
    scores = scores.clone()
    vocab = scores.shape[-1]
    biased = [
        (row, token, value)
        for row, p in enumerate(params)
        for token, value in p.logit_bias.items()
        if token < vocab
    ]
    if biased:
        rows, tokens, values = zip(*biased, strict=True)
        index = (torch.tensor(rows), torch.tensor(tokens))
        scores.index_put_(index, torch.tensor(values, dtype=scores.dtype), accumulate=True)
    seen = torch.stack([history.seen for history in histories])
    counts = torch.stack([history.counts for history in histories])
    penalty = torch.tensor([p.repetition_penalty for p in params]).unsqueeze(-1)
    repeated = torch.where(scores < 0, scores * penalty, scores / penalty)
    scores = torch.where(seen & (penalty != 1.0), repeated, scores)
    frequency = torch.tensor([p.frequency_penalty for p in params]).unsqueeze(-1)
    presence = torch.tensor([p.presence_penalty for p in params]).unsqueeze(-1)
    return scores - counts * frequency - (counts > 0) * presence


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
    try:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    except RuntimeError:  # every token masked (a grammar at a dead end): the job fails alone
        return int(scores.argmax())


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    histories: list[TokenHistory | None] | None = None,
    known: dict[int, int] | None = None,
) -> list[int]:
    """One next token per row: plain greedy rows in one argmax; rows that adjust their logits
    (their histories needed then) adjusted together; rows that sample each on their own.
    `known` holds rows' argmax found already (RowLogprobs.best_tokens, on logits nothing
    changed since): when it covers every plain greedy row, no argmax runs."""
    own_rows = [row for row, p in enumerate(params) if not p.greedy or p.adjusts_logits]
    if known and len(known.keys() - own_rows) == len(params) - len(own_rows):
        chosen = [known.get(row, 0) for row in range(len(params))]
    else:
        chosen = logits.argmax(dim=-1).tolist()
    if not own_rows:
        return chosen
    cpu_logits = logits[own_rows].float().cpu()
    adjusting = [slot for slot, row in enumerate(own_rows) if params[row].adjusts_logits]
    if adjusting:
        assert histories is not None, "penalties need each row's tokens"
        rows = [own_rows[slot] for slot in adjusting]
        cpu_logits[adjusting] = adjust_logits(
            cpu_logits[adjusting], [params[row] for row in rows], [histories[row] for row in rows]
        )
    for slot, row in enumerate(own_rows):
        p, scores = params[row], cpu_logits[slot]
        chosen[row] = int(scores.argmax()) if p.greedy else sample_token(scores, p, generators[row])
    return chosen


# What a log-probability of minus infinity (a token the model rules out) is reported as, as
# vLLM does: JSON has no infinity.
LOWEST_LOGPROB = -9999.0


def model_logprobs(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The log-probabilities of these rows as the model gives them (log_softmax of the raw
    logits), in a new tensor: masks and penalties applied to `logits` later leave them be."""
    if len(rows) < logits.shape[0]:
        logits = logits[rows]
    return torch.log_softmax(logits.float(), dim=-1)


class RowLogprobs:
    """Rows of log-probabilities with each row's likeliest tokens, best first, made into
    TokenLogprob entries once the rows' tokens are chosen. A decode step pays for this on
    every step, so the work stays in few calls: one topk and two lists out of torch for all
    rows; a chosen token among a row's likeliest takes its value from there, so only the
    others are gathered."""

    def __init__(self, logprobs: torch.Tensor, tops: list[int]) -> None:
        self.logprobs, self.tops = logprobs, tops
        most = max(tops, default=0)
        # At least two, so that a row's best token can be seen to stand alone (best_tokens).
        self.k = min(max(most, 2), logprobs.shape[-1]) if most else 0
        if self.k:
            best = logprobs.topk(self.k, dim=-1)
            # Clamped after the topk: the same values, on k columns instead of the vocabulary.
            self.values: list[list[float]] = best.values.clamp_(min=LOWEST_LOGPROB).tolist()
            self.ids: list[list[int]] = best.indices.tolist()
        else:
            self.values, self.ids = [[] for _ in tops], [[] for _ in tops]

    def best_tokens(self) -> dict[int, int]:
        """Row -> its likeliest token, for the rows where it is strictly likelier than any
        other: the argmax of the row's logits (the log-softmax keeps their order), found
        without running one. Rows with a tie are left out: argmax picks the first of them."""
        return {
            row: ids[0]
            for row, (ids, values) in enumerate(zip(self.ids, self.values, strict=True))
            if len(values) > 1 and values[0] > values[1]
        }

    def entries(self, tokens: list[int]) -> list[TokenLogprob]:
        """Each row's entry for its chosen token: its log-probability and the row's `tops`
        likeliest tokens."""
        entries: list[TokenLogprob] = []
        missing: list[int] = []  # rows whose token is not among their likeliest
        k = self.k
        for token, ids, values, top in zip(tokens, self.ids, self.values, self.tops, strict=True):
            alternatives = tuple(zip(ids if top == k else ids[:top], values, strict=False))
            if token in ids:
                entries.append((token, values[ids.index(token)], alternatives))
            else:
                missing.append(len(entries))
                entries.append((token, LOWEST_LOGPROB, alternatives))
        if missing:
            device = self.logprobs.device
            rows = torch.tensor(missing, dtype=torch.long, device=device)
            wanted = torch.tensor([tokens[r] for r in missing], dtype=torch.long, device=device)
            found = self.logprobs[rows, wanted].clamp_(min=LOWEST_LOGPROB).tolist()
            for row, value in zip(missing, found, strict=True):
                token, _, alternatives = entries[row]
                entries[row] = (token, value, alternatives)
        return entries


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its `tops[row]` likeliest tokens, best
    first, from the rows' raw logits (one log_softmax and one topk for all of them)."""
    return logprob_entries(torch.log_softmax(logits.float(), dim=-1), tokens, tops)


def logprob_entries(
    logprobs: torch.Tensor, tokens: list[int], tops: list[int]
) -> list[TokenLogprob]:
    """token_logprobs from rows of log-probabilities (a decode step's, or a scoring pass's)."""
    return RowLogprobs(logprobs, tops).entries(tokens)
