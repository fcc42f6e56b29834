"""Scoring (`llmq.score` jobs): the log-likelihood of each continuation after a prompt, computed
as lm-evaluation-harness's Hugging Face backend computes it (`HFLM._loglikelihood_tokens`).

Tokens: the prompt and each continuation are encoded together with the tokenizer's default
special tokens, and the continuation's tokens are those past the prompt's own encoding;
whitespace ending the prompt moves to the continuation first. An empty prompt becomes the BOS
token (or EOS when there is none). The model reads the last `max_length` tokens of prompt +
continuation without its final token; the score is the sum of the continuation tokens'
log-softmax, and `greedy` tells whether argmax decoding would produce them all.

Batching: rows are right-padded with no attention mask, as lm-eval runs them. Continuations
whose model input is the same row (an MMLU question's ` A` … ` D`: one token after a shared
prompt) share one row, so one forward pass scores all of a question's choices, and the rows of
many jobs share each forward pass. Only the positions some continuation needs get logits.

The engine thread runs these forward passes between its decode steps, so the model is only ever
used by one thread and scoring and generation take turns (see GenerationEngine.submit_score).
"""

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
import torch

from llmq.protocol import BATCH_PRIORITY
from workers.engine_jobs import ScoreOutput, ScoreRequest, ScoreTimeout
from workers.host import ModelHost
from workers.sampling import TokenLogprob, logprob_entries

log = structlog.get_logger(__name__)


@dataclass
class PendingScore:
    request: ScoreRequest
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)

    @property
    def background(self) -> bool:
        return self.request.priority >= BATCH_PRIORITY


@dataclass
class _Row:
    tokens: list[int]
    # The continuation lengths read from this row: each scores the row's last `n` positions.
    needed: int = 0
    logprobs: torch.Tensor | None = None  # [needed, vocab], the row's last `needed` positions
    greedy: torch.Tensor | None = None  # [needed]


class Scorer:
    """Scores pending requests in as few forward passes as the token budget allows."""

    def __init__(
        self,
        host: ModelHost,
        max_pass_tokens: int,
        on_pass: Callable[[str, float], None] | None = None,
    ) -> None:
        self.host = host
        self.max_pass_tokens = max_pass_tokens
        self.on_pass = on_pass  # (pass kind, seconds) after each forward pass

    def run(self, pending: list[PendingScore]) -> None:
        """Resolve every pending future with its output or its error."""
        now = time.monotonic()
        live = []
        for item in pending:
            deadline = item.request.deadline
            if deadline is not None and now > deadline:
                item.future.set_exception(ScoreTimeout("the job ran past its deadline"))
            else:
                live.append(item)
        try:
            self._score(live)
        except Exception as exc:  # one bad job must not fail the others: score each alone
            unresolved = [item for item in live if not item.future.done()]
            if len(live) == 1:
                for item in unresolved:
                    item.future.set_exception(exc)
                return
            log.warning("batched scoring failed; scoring each job alone", error=str(exc))
            for item in unresolved:
                self.run([item])

    def _score(self, pending: list[PendingScore]) -> None:
        rows: dict[tuple[int, ...], _Row] = {}
        plans = []  # per job: (row key, continuation tokens) per pair
        for item in pending:
            plan = []
            for context, continuation in item.request.pairs:
                if not context or not continuation:
                    raise ValueError("a prompt and a continuation must each have a token")
                if len(continuation) > item.request.max_length:
                    raise ValueError(
                        f"a continuation is {len(continuation)} tokens; the model reads "
                        f"{item.request.max_length}"
                    )
                key = tuple((context + continuation)[-(item.request.max_length + 1) :][:-1])
                row = rows.setdefault(key, _Row(list(key)))
                row.needed = max(row.needed, len(continuation))
                plan.append((key, continuation))
            plans.append(plan)
        for chunk in self._chunks(sorted(rows.values(), key=lambda r: -len(r.tokens))):
            self._forward(chunk)
        finished = time.monotonic()
        for item, plan in zip(pending, plans, strict=True):
            scores, greedy, seen = [], [], set()
            details: list[list[TokenLogprob]] = []
            for key, continuation in plan:
                row = rows[key]
                logprobs = row.logprobs[-len(continuation) :]
                choices = row.greedy[-len(continuation) :]
                wanted = torch.tensor(continuation, device=logprobs.device)
                picked = torch.gather(logprobs, 1, wanted.unsqueeze(-1)).squeeze(-1)
                scores.append(float(picked.sum()))
                greedy.append(bool((choices == wanted).all()))
                seen.add(key)
                if item.request.top_logprobs is not None:
                    tops = [item.request.top_logprobs] * len(continuation)
                    details.append(logprob_entries(logprobs, continuation, tops))
            item.future.set_result(
                ScoreOutput(
                    loglikelihoods=scores,
                    greedy=greedy,
                    input_tokens=sum(len(key) for key in seen),
                    duration_ms=(finished - item.submitted_at) * 1000,
                    token_logprobs=details if item.request.top_logprobs is not None else None,
                )
            )

    def _chunks(self, rows: list[_Row]):
        """Rows longest first (like lm-eval), as many per pass as the token budget holds."""
        chunk: list[_Row] = []
        for row in rows:
            if chunk and (len(chunk) + 1) * len(chunk[0].tokens) > self.max_pass_tokens:
                yield chunk
                chunk = []
            chunk.append(row)
        if chunk:
            yield chunk

    def _forward(self, rows: list[_Row]) -> None:
        width = len(rows[0].tokens)
        ids = torch.full((len(rows), width), self.host.pad_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row.tokens)] = torch.tensor(row.tokens)
        # Logits only from the first position any row needs to the end.
        keep = width - min(len(row.tokens) - row.needed for row in rows)
        started = time.perf_counter()
        logits = self.host.forward(
            "score", input_ids=ids.to(self.host.device), logits_to_keep=keep, use_cache=False
        ).logits
        if self.on_pass is not None:
            self.on_pass("score", time.perf_counter() - started)
        logprobs = torch.log_softmax(logits, dim=-1)
        for index, row in enumerate(rows):
            end = len(row.tokens) - (width - keep)  # the row's last position, in kept columns
            row.logprobs = logprobs[index, end - row.needed : end]
            row.greedy = row.logprobs.argmax(dim=-1)
