"""The batching engine: continuous (iteration-level) batching over a plain Transformers model.

One engine thread owns the model. Celery task threads `submit` requests and wait on futures.
At every decode-step boundary the engine admits waiting requests (prefill, then merge into the
running batch's KV cache) and drops finished ones, so a short job never waits behind a long one.
The running batch keeps one left-padded KV cache; `_Batch.concat` and `_Batch.select` are the
join and leave operations (after TGI's CausalLMBatch.concatenate/filter).
"""

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
import torch
from transformers import DynamicCache

from llmq.protocol import FinishReason, SamplingParams
from workers.host import ModelHost
from workers.sampling import choose_tokens, make_generator

log = structlog.get_logger(__name__)


class JobTimeout(Exception):
    """The job ran past its deadline."""


class EngineStopped(Exception):
    """The engine shut down before the job finished."""


@dataclass(frozen=True)
class GenerationRequest:
    job_id: uuid.UUID
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None = None  # time.monotonic() value


@dataclass(frozen=True)
class GenerationOutput:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    duration_ms: float


@dataclass
class _Sequence:
    request: GenerationRequest
    future: Future
    generator: torch.Generator
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    text: str = ""
    first_token_at: float | None = None
    cancelled: bool = False
    stopped: bool = False  # text already cut at a stop string

    @property
    def budget(self) -> int:
        return len(self.request.prompt_ids) + self.request.params.max_tokens


@dataclass
class _Batch:
    """Running sequences with their shared left-padded KV cache and next-token logits."""

    seqs: list[_Sequence]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [batch, heads, length, dim]
    mask: torch.Tensor  # [batch, length], 0 where a row is padded on the left
    logits: torch.Tensor  # [batch, vocab], for the token each row picks next

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def padded_to(self, length: int) -> "_Batch":
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
        return _Batch(self.seqs, kv, torch.nn.functional.pad(self.mask, (extra, 0)), self.logits)

    def concat(self, other: "_Batch") -> "_Batch":
        length = max(self.length, other.length)
        a, b = self.padded_to(length), other.padded_to(length)
        kv = [
            (torch.cat([ka, kb]), torch.cat([va, vb]))
            for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
        ]
        return _Batch(
            a.seqs + b.seqs, kv, torch.cat([a.mask, b.mask]), torch.cat([a.logits, b.logits])
        )

    def select(self, rows: list[int]) -> "_Batch":
        """Keep only `rows`, and drop left columns that are padding in every remaining row."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).long().cumprod(0).sum().item())
        kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.kv
        ]
        return _Batch(
            [self.seqs[r] for r in rows], kv, mask[:, start:], self.logits.index_select(0, index)
        )


class GenerationEngine:
    """submit / cancel from any thread; the engine thread runs prefill and decode steps."""

    def __init__(
        self,
        host: ModelHost,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: int,
        continuous: bool = True,
    ) -> None:
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.continuous = continuous
        self._inbox: queue.Queue[_Sequence] = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._batch: _Batch | None = None
        self._cancel_requests: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmq-engine", daemon=True)
        self.steps = 0

    # -- the surface used by other threads -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        seq = _Sequence(request, future, make_generator(request.params.seed), time.monotonic())
        if self._stop.is_set():
            future.set_exception(EngineStopped("the worker is shutting down"))
        else:
            self._inbox.put(seq)
        return future

    def cancel(self, job_id: uuid.UUID) -> None:
        """The job leaves its batch at the next step boundary."""
        with self._lock:
            self._cancel_requests.add(job_id)

    def active_job_ids(self) -> list[uuid.UUID]:
        batch, waiting = self._batch, list(self._waiting)
        running = [s.request.job_id for s in batch.seqs] if batch else []
        return running + [s.request.job_id for s in waiting]

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._collect(block=self._batch is None and not self._waiting)
                    self._admit()
                    if self._batch is not None:
                        self._step()
                except Exception as exc:  # the batch is lost, but never the engine
                    log.exception("engine step failed")
                    self._fail_batch(exc)
        self._fail_all(EngineStopped("the worker is shutting down"))

    def _collect(self, block: bool) -> None:
        """Move submitted requests to the waiting list; when idle, wait for a micro-batch."""
        if block:
            try:
                self._waiting.append(self._inbox.get(timeout=0.1))
            except queue.Empty:
                return
            # Give concurrent submitters max_wait to join this micro-batch.
            deadline = time.monotonic() + self.max_wait_s
            while len(self._waiting) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    self._waiting.append(self._inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        """Prefill waiting requests that fit the batch's size and token budget, then merge them."""
        self._drop_cancelled_waiting()
        if not self._waiting or (self._batch is not None and not self.continuous):
            return
        running = self._batch.seqs if self._batch else []
        tokens = sum(s.budget for s in running)
        admitted: list[_Sequence] = []
        for seq in list(self._waiting):
            if len(running) + len(admitted) >= self.max_batch_size:
                break
            alone = not running and not admitted
            if not alone and tokens + seq.budget > self.max_batch_tokens:
                break
            tokens += seq.budget
            admitted.append(seq)
        if not admitted:
            return
        self._waiting = self._waiting[len(admitted) :]
        fresh = self._prefill(admitted)
        if fresh is None:
            return
        self._batch = fresh if self._batch is None else self._batch.concat(fresh)

    def _prefill(self, seqs: list[_Sequence]) -> _Batch | None:
        try:
            return self._forward_prompts(seqs)
        except Exception:
            if len(seqs) == 1:
                raise
        # One prompt broke the batched prefill: run each alone so only the culprit fails.
        batches = []
        for seq in seqs:
            try:
                batches.append(self._forward_prompts([seq]))
            except Exception as exc:
                log.warning("prefill failed", job_id=str(seq.request.job_id), error=str(exc))
                seq.future.set_exception(exc)
        merged: _Batch | None = None
        for batch in batches:
            merged = batch if merged is None else merged.concat(batch)
        return merged

    def _forward_prompts(self, seqs: list[_Sequence]) -> _Batch:
        device = self.host.device
        longest = max(len(s.request.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.host.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            prompt = seq.request.prompt_ids
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.host.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        return _Batch(seqs, _cache_tensors(out.past_key_values), mask, out.logits[:, -1, :])

    def _step(self) -> None:
        """Pick one token per row, retire finished rows, and run one decode forward pass."""
        batch = self._batch
        assert batch is not None
        now = time.monotonic()
        with self._lock:
            cancels, self._cancel_requests = self._cancel_requests, set()
        params = [s.request.params for s in batch.seqs]
        tokens = choose_tokens(batch.logits, params, [s.generator for s in batch.seqs])
        keep: list[int] = []
        for row, (seq, token) in enumerate(zip(batch.seqs, tokens, strict=True)):
            if seq.request.job_id in cancels:
                seq.cancelled = True
            if self._advance(seq, token, now):
                keep.append(row)
        self._apply_stop_strings([batch.seqs[row] for row in keep], now)
        keep = [row for row in keep if not batch.seqs[row].future.done()]
        self.steps += 1
        if not keep:
            self._batch = None
            return
        if len(keep) < len(batch.seqs):
            batch = batch.select(keep)
        next_ids = torch.tensor([[batch.seqs[i].generated[-1]] for i in range(len(keep))])
        self._batch = self._forward_step(batch, next_ids.to(self.host.device))

    def _forward_step(self, batch: _Batch, next_ids: torch.Tensor) -> _Batch:
        positions = batch.mask.sum(-1, keepdim=True)
        mask = torch.cat([batch.mask, torch.ones_like(positions)], dim=-1)
        out = self.host.model(
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=DynamicCache(batch.kv),
            use_cache=True,
        )
        return _Batch(batch.seqs, _cache_tensors(out.past_key_values), mask, out.logits[:, -1, :])

    def _advance(self, seq: _Sequence, token: int, now: float) -> bool:
        """Append `token` to `seq`; finish it if it is done. True while it keeps running."""
        request = seq.request
        if seq.cancelled:
            return self._finish(seq, FinishReason.CANCELLED, now)
        if request.deadline is not None and now > request.deadline:
            seq.future.set_exception(JobTimeout("the job ran past its deadline"))
            return False
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token == self.host.eos_token_id and not request.params.ignore_eos:
            return self._finish(seq, FinishReason.STOP, now)
        seq.generated.append(token)
        context_full = len(request.prompt_ids) + len(seq.generated) >= self.host.spec.context_length
        if len(seq.generated) >= request.params.max_tokens or context_full:
            return self._finish(seq, FinishReason.LENGTH, now)
        return True

    def _apply_stop_strings(self, seqs: list[_Sequence], now: float) -> None:
        """Finish sequences whose text now contains one of their stop strings (cut before it)."""
        watched = [s for s in seqs if s.request.params.stop and not s.future.done()]
        if not watched:
            return
        texts = self.host.decode_batch([s.generated for s in watched])
        for seq, text in zip(watched, texts, strict=True):
            cuts = [i for i in (text.find(stop) for stop in seq.request.params.stop) if i != -1]
            if cuts:
                seq.text = text[: min(cuts)]
                seq.stopped = True
                self._finish(seq, FinishReason.STOP, now)

    def _finish(self, seq: _Sequence, reason: FinishReason, now: float) -> bool:
        first = seq.first_token_at
        if not seq.stopped:
            seq.text = self.host.decode(seq.generated)
        seq.future.set_result(
            GenerationOutput(
                text=seq.text,
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=len(seq.generated),
                time_to_first_token_ms=None if first is None else (first - seq.submitted_at) * 1000,
                duration_ms=(now - seq.submitted_at) * 1000,
            )
        )
        return False

    def _drop_cancelled_waiting(self) -> None:
        with self._lock:
            cancels = set(self._cancel_requests)
        if not cancels:
            return
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.request.job_id in cancels]:
            self._waiting.remove(seq)
            self._finish(seq, FinishReason.CANCELLED, now)

    def _fail_batch(self, exc: Exception) -> None:
        if self._batch is not None:
            for seq in self._batch.seqs:
                if not seq.future.done():
                    seq.future.set_exception(exc)
        self._batch = None

    def _fail_all(self, exc: Exception) -> None:
        self._fail_batch(exc)
        pending = self._waiting
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for seq in pending:
            if not seq.future.done():
                seq.future.set_exception(exc)
        self._waiting = []


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]
