"""The batching engine: continuous (iteration-level) batching over a plain Transformers model.

One engine thread owns the model. Celery task threads `submit` requests and wait on futures.
At every decode-step boundary the engine admits waiting requests (prefill, then merge into the
running batch's KV cache) and drops finished ones, so a short job never waits behind a long one.

Each step's text deltas go to `on_tokens` (the token publisher) in one call, before any job of
that step is resolved, so a job's final event always follows its last token event. Background
jobs publish their text in one delta when they finish.

Two lanes, each with its own running batch: interactive jobs, and background jobs (Batch API
lines and evaluation items, BATCH_PRIORITY). While interactive work runs, the background lane
gets at most `background_share` of the engine's time, so an interactive job steps in a small
batch instead of inside a full one of background jobs; when no interactive job is there, the
background lane runs alone at full speed.
"""

import bisect
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import structlog
import torch
from transformers import Cache

from llmq.events import TokenEvent
from llmq.protocol import BATCH_PRIORITY, FinishReason
from llmq.publisher import TokenEmission
from workers.batch import ROOM, Batch, Group, GrowingLayer, group_cost_cells, length_groups
from workers.constraints import COMPILE_LIMIT_S, ConstraintFailed, Constraints, mask_rows
from workers.detokenize import TextState, advance_texts
from workers.engine_jobs import (
    EngineStopped,
    EngineTimings,
    GenerationOutput,
    GenerationRequest,
    JobTimeout,
)
from workers.host import ModelHost
from workers.memory import release_free_memory
from workers.metrics import EngineMetrics, EngineObserver
from workers.sampling import (
    RowLogprobs,
    TokenHistory,
    TokenLogprob,
    choose_tokens,
    make_generator,
    model_logprobs,
)
from workers.scoring import PendingScore, Scorer, ScoreRequest

log = structlog.get_logger(__name__)


_FAILED = object()  # the job's future already holds its error (a timeout, a dead-end grammar)
# Background time saved up while it had nothing to run is capped, so batch lines arriving
# during a long interactive stretch cannot take the engine for long in one burst.
_MAX_BACKGROUND_CREDIT_S = 0.1
# How long a background scoring turn may last while interactive work runs or ran within
# _INTERACTIVE_RECENT_S, and otherwise (at least one job): a scoring pass costs about in
# proportion to its tokens, and interactive work arriving waits for the turn under way.
_BACKGROUND_TURN_S = 0.02
_IDLE_BACKGROUND_TURN_S = 0.1
# Interactive work seen this recently is likely to come again soon: a client's next request
# arrives tens of ms after its last ended, in the gap where the background lane runs alone.
_INTERACTIVE_RECENT_S = 1.0
# A background scoring job waiting this long is scored before longer ones (_score_some).
_SCORE_AGED_S = 30.0


@dataclass
class _Sequence:
    request: GenerationRequest
    future: Future
    generator: torch.Generator
    submitted_at: float
    detok: TextState
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    deltas_sent: int = 0
    matcher: object | None = None  # an llguidance matcher, when the job has a constraint
    compile_settled: bool = False  # its matcher came, or its compile ran out of time
    history: TokenHistory | None = None  # its tokens as penalties read them, if it has any
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0  # entries already carried by token events
    # Recorded for timed (traced) requests only: see EngineTimings.
    admitted_at: float | None = None
    prefilled_at: float | None = None
    lane: "_Lane | None" = None
    steps_at_join: int = 0
    rows_at_join: int = 0

    @property
    def budget(self) -> int:
        return len(self.request.prompt_ids) + self.request.params.max_tokens

    @property
    def background(self) -> bool:
        return self.request.priority >= BATCH_PRIORITY


@dataclass
class _Lane:
    """One running batch: its sequences share a KV cache and step together."""

    background: bool
    batch: Batch[_Sequence] | None = None
    steps_since_join: int = 0  # decode steps of the running batch since newcomers last joined
    steps_total: int = 0  # decode steps ever, and their rows summed: a timed job's batch
    rows_total: int = 0  # figures are the differences between its joining and its end


class GenerationEngine:
    """submit / cancel from any thread; the engine thread runs prefill and decode steps."""

    def __init__(
        self,
        host: ModelHost,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: int,
        max_score_tokens: int = 8192,
        join_every_steps: int = 1,
        max_cache_groups: int = 4,
        continuous: bool = True,
        background_share: float = 0.2,
        on_tokens: Callable[[list[TokenEmission]], None] | None = None,
        observer: EngineObserver | None = None,
        on_cycle: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.continuous = continuous
        self.join_every_steps = join_every_steps
        # A model without ragged attention keeps its running batch in one cache.
        self.max_cache_groups = max_cache_groups if host.ragged_attention else 1
        self.group_cost_cells = group_cost_cells(host.hidden_size)
        self.on_tokens = on_tokens
        # Called by the engine thread after each cycle (one decode step per lane at most): an
        # engine process sends the cycle's report to the worker process from it.
        self.on_cycle = on_cycle
        self._inbox: queue.Queue[_Sequence | PendingScore] = queue.Queue()
        self._waiting: list[_Sequence] = []
        self._interactive = _Lane(background=False)
        self._background = _Lane(background=True)
        # Engine seconds the background lane may still use while interactive work runs: each
        # interactive second earns share / (1 - share), each background second spends one.
        self._background_credit = 0.0
        self._background_rate = background_share / (1 - background_share)
        self._background_turn_s = 0.0  # how long its last turn took
        self._interactive_seen_at = float("-inf")  # when interactive work last ran
        self._cancel_requests: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmq-engine", daemon=True)
        self.steps = 0
        # This process's Prometheus metrics, unless the observations go elsewhere.
        self.metrics = (
            observer
            if observer is not None
            else EngineMetrics(host.spec.id, host.spec.queue(host.device), self.active_job_ids)
        )
        # Scoring jobs take turns with decode steps on this thread (workers/scoring.py): one
        # turn scores about max_score_tokens, so a turn stays short beside interactive jobs.
        self.max_score_tokens = max_score_tokens
        self.scorer = Scorer(host, max_score_tokens, on_pass=self.metrics.forward_pass)
        self._scoring: list[PendingScore] = []
        self._score_s_per_token = 0.0  # a moving average of scoring passes' cost
        self.constraints: Constraints | None = None  # structured output, on first use
        # Freed memory goes back to the system once the engine idles after work (workers/memory.py).
        self._memory_released = False
        self.memory_releases = 0

    # -- the surface used by other threads -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        seq = _Sequence(
            request,
            future,
            make_generator(request.params.seed),
            time.monotonic(),
            TextState(stops=list(request.params.stop)),
        )
        if self._stop.is_set():
            future.set_exception(EngineStopped("the worker is shutting down"))
        elif request.params.constraint is not None:
            # The engine thread sees it once its grammar has compiled, on another thread.
            compiling = self._constraints().matcher(request.params.constraint)
            if not compiling.done():  # a grammar that compiles too long fails its job alone
                limit = threading.Timer(COMPILE_LIMIT_S, self._compile_overdue, (seq,))
                limit.daemon = True
                limit.start()
            compiling.add_done_callback(partial(self._compiled, seq))
        else:
            self._inbox.put(seq)
        return future

    def _constraints(self) -> Constraints:
        with self._lock:
            if self.constraints is None:
                vocab = self.host.model.get_output_embeddings().weight.shape[0]
                self.constraints = Constraints(self.host.tokenizer, vocab)
            return self.constraints

    def _compile_overdue(self, seq: _Sequence) -> None:
        message = f"the constraint did not compile within {COMPILE_LIMIT_S:g} s"
        self._compile_settled(seq, ConstraintFailed(message))

    def _compiled(self, seq: _Sequence, compiling: Future) -> None:
        try:
            seq.matcher = compiling.result()
        except Exception as exc:
            failed = exc if isinstance(exc, ConstraintFailed) else ConstraintFailed(str(exc))
            self._compile_settled(seq, failed)
        else:
            self._compile_settled(seq, None)

    def _compile_settled(self, seq: _Sequence, failed: Exception | None) -> None:
        """The first of compile and time limit decides: the job runs, or fails with `failed`."""
        with self._lock:
            if seq.compile_settled:
                return
            seq.compile_settled = True
        if failed is not None:
            seq.future.set_exception(failed)
        else:
            self._inbox.put(seq)

    def submit_score(self, request: ScoreRequest) -> Future:
        """Score continuations; runs between decode steps, batched with other scoring jobs."""
        pending = PendingScore(request)
        if self._stop.is_set():
            pending.future.set_exception(EngineStopped("the worker is shutting down"))
        else:
            self._inbox.put(pending)
        return pending.future

    def cancel(self, job_id: uuid.UUID) -> None:
        """The job leaves its batch at the next step boundary."""
        with self._lock:
            self._cancel_requests.add(job_id)

    def running(self) -> list[_Sequence]:
        return [seq for lane in self._lanes() if lane.batch for seq in lane.batch.seqs]

    def active_job_ids(self) -> list[uuid.UUID]:
        waiting = list(self._waiting)
        return [s.request.job_id for s in self.running() + waiting]

    # -- the engine thread -------------------------------------------------------------------

    def _lanes(self) -> tuple[_Lane, _Lane]:
        return self._interactive, self._background

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._cycle()
                except Exception as exc:  # the running batches are lost, but never the engine
                    log.exception("engine cycle failed")
                    for lane in self._lanes():
                        self._fail_lane(lane, exc)
                if self.on_cycle is not None:
                    self.on_cycle()
        self._fail_all(EngineStopped("the worker is shutting down"))

    def _cycle(self) -> None:
        idle = (
            all(lane.batch is None for lane in self._lanes())
            and not self._waiting
            and not self._scoring
        )
        self._collect(block=idle)
        self._drop_cancelled_waiting()
        self._score_some(background=False)
        earned = self._background_rate * self._timed_turn(self._interactive)
        ceiling = max(_MAX_BACKGROUND_CREDIT_S, self._background_turn_s)
        self._background_credit = min(self._background_credit + earned, ceiling)
        if not self._interactive_busy():
            self._background_credit = 0.0
            self._background_turn()
            return
        self._interactive_seen_at = time.monotonic()  # before the turn: _score_budget reads it
        if self._background_credit >= self._background_turn_s:
            # Only a whole turn's worth of credit runs one, so a short interactive job is not
            # held up by a background step it did not yet pay for.
            self._background_credit -= self._background_turn()

    def _background_turn(self) -> float:
        """One decode step of the background lane and one turn of background scoring."""
        started = time.monotonic()
        self._turn(self._background)
        scored = self._score_some(background=True)
        spent = time.monotonic() - started
        if self._background.batch is not None or scored:
            self._background_turn_s = spent
        return spent

    def _interactive_busy(self) -> bool:
        return (
            self._interactive.batch is not None
            or any(not s.background for s in self._waiting)
            or any(not p.background for p in self._scoring)
        )

    def _timed_turn(self, lane: _Lane) -> float:
        started = time.monotonic()
        self._turn(lane)
        return time.monotonic() - started

    def _turn(self, lane: _Lane) -> None:
        """Admit the lane's waiting jobs, then run one decode step of its batch."""
        try:
            self._admit(lane)
            if lane.batch is not None:
                self._step(lane)
        except Exception as exc:  # the lane's batch is lost, but never the engine
            log.exception("engine step failed")
            self._fail_lane(lane, exc)

    def _collect(self, block: bool) -> None:
        """Move submitted requests to the waiting list; when idle, wait for a micro-batch."""
        if block:
            try:
                self._receive(self._inbox.get(timeout=0.1))
            except queue.Empty:
                if not self._memory_released and release_free_memory():  # idle after work
                    self._memory_released = True
                    self.memory_releases += 1
                return
            # Give concurrent submitters max_wait to join this micro-batch.
            deadline = time.monotonic() + self.max_wait_s
            while len(self._waiting) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    self._receive(self._inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                self._receive(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _receive(self, item: _Sequence | PendingScore) -> None:
        self._memory_released = False
        if isinstance(item, PendingScore):
            self._scoring.append(item)
        else:  # after those of its priority, before those of lower priority
            bisect.insort(self._waiting, item, key=lambda seq: seq.request.priority)

    def _score_some(self, background: bool) -> bool:
        """One turn of scoring: waiting scoring jobs of the kind, about the turn's budget of
        them (at least one job), resolved here. True if it scored any. Interactive jobs go in
        the order they came. Background jobs go longest row first, as lm-eval orders its
        requests: a pass pads its rows to its longest, and taken in arrival order an MMLU run's
        passes were 30% padding; a job that has waited _SCORE_AGED_S goes first all the same."""
        budget = self._score_budget(background)
        candidates = [p for p in self._scoring if p.background == background]
        if background:
            aged = time.monotonic() - _SCORE_AGED_S
            candidates.sort(key=lambda p: (p.submitted_at > aged, -p.request.longest_row))
        turn: list[PendingScore] = []
        tokens = 0
        for pending in candidates:
            if not turn or tokens + pending.request.tokens <= budget:
                turn.append(pending)
                tokens += pending.request.tokens
        if not turn:
            return False
        taken = {id(pending) for pending in turn}
        self._scoring = [p for p in self._scoring if id(p) not in taken]
        started = time.monotonic()
        self.scorer.run(turn)
        seconds_per_token = (time.monotonic() - started) / max(tokens, 1)
        known = self._score_s_per_token or seconds_per_token
        self._score_s_per_token = known + (seconds_per_token - known) / 4
        return True

    def _score_budget(self, background: bool) -> int:
        """Tokens a scoring turn may take. A background turn lasts about _BACKGROUND_TURN_S
        while interactive work runs and in the gaps between its jobs (_cycle notes when it last
        ran), so that an interactive job waits about a step's time for the turn under way
        rather than a whole pass of max_score_tokens: with 100 ms turns in the gaps, a 16-token
        request's p50 beside an MMLU run was 2.06x its idle p50, with 20 ms turns 1.29x
        (bench.interactive). Without interactive work, a turn lasts about
        _IDLE_BACKGROUND_TURN_S: fewer, larger turns, each turn's results costing the worker
        one commit (20 ms turns throughout made an MMLU run alone slower: 16.8-18.1 s against
        12.0-12.8 s, runs not alternated)."""
        if not background or self._score_s_per_token <= 0:
            return self.max_score_tokens
        recently = time.monotonic() - self._interactive_seen_at < _INTERACTIVE_RECENT_S
        turn_s = _BACKGROUND_TURN_S if recently else _IDLE_BACKGROUND_TURN_S
        return min(self.max_score_tokens, int(turn_s / self._score_s_per_token))

    def _admit(self, lane: _Lane) -> None:
        """Prefill the lane's waiting requests that fit its batch's size and token budget, then
        merge them into it."""
        candidates = [s for s in self._waiting if s.background == lane.background]
        if not candidates or (lane.batch is not None and not self.continuous):
            return
        running = lane.batch.seqs if lane.batch else []
        if running and not self._join_due(lane, len(candidates)):
            return
        tokens = sum(s.budget for s in running)
        admitted: list[_Sequence] = []
        for seq in candidates:
            if len(running) + len(admitted) >= self.max_batch_size:
                break
            alone = not running and not admitted
            if not alone and tokens + seq.budget > self.max_batch_tokens:
                break
            tokens += seq.budget
            admitted.append(seq)
        if not admitted:
            return
        taken = {id(s) for s in admitted}
        self._waiting = [s for s in self._waiting if id(s) not in taken]
        # Newcomers of very different lengths prefill in groups of similar lengths, so that a
        # short prompt is not padded to the longest; each group joins as its own cache group.
        free = self.max_cache_groups - (len(lane.batch.groups) if lane.batch else 0)
        lengths = [len(s.request.prompt_ids) for s in admitted]
        for rows in length_groups(lengths, most=free):
            fresh = self._prefill([admitted[row] for row in rows])
            if fresh is None:
                continue
            for seq in fresh.seqs:
                if seq.request.timed:
                    seq.lane, seq.steps_at_join, seq.rows_at_join = (
                        lane,
                        lane.steps_total,
                        lane.rows_total,
                    )
            if lane.batch is not None:
                fresh = lane.batch.concat(fresh, self.max_cache_groups, self.group_cost_cells)
            lane.batch = fresh
            lane.steps_since_join = 0

    def _join_due(self, lane: _Lane, waiting: int) -> bool:
        """Whether newcomers join the running batch now: every join_every_steps decode steps,
        or sooner when they fill it. A join costs a prefill pass, which on a CPU costs about a
        whole step however few prompts it carries, so newcomers arriving one by one join in
        groups instead of each paying a pass."""
        assert lane.batch is not None
        free = self.max_batch_size - len(lane.batch.seqs)
        return lane.steps_since_join >= self.join_every_steps or waiting >= free

    def _prefill(self, seqs: list[_Sequence]) -> Batch | None:
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
        merged: Batch | None = None
        for batch in batches:
            merged = (
                batch
                if merged is None
                else merged.concat(batch, self.max_cache_groups, self.group_cost_cells)
            )
        return merged

    def _forward_prompts(self, seqs: list[_Sequence]) -> Batch:
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
        # Each decode step appends a column; a row takes its first token from this pass.
        steps = max(s.request.params.max_tokens for s in seqs) - 1
        cache = Cache(layer_class_to_replicate=partial(GrowingLayer, room=min(ROOM, steps)))
        began = time.monotonic()
        started = time.perf_counter()
        out = self.host.forward(
            "prefill",
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.host.cache_argument: cache},
            logits_to_keep=1,
        )
        self.metrics.forward_pass("prefill", time.perf_counter() - started)
        ended = time.monotonic()
        for seq in seqs:
            if seq.request.timed:
                seq.admitted_at, seq.prefilled_at = began, ended
        return Batch(seqs, [Group(cache.layers, mask)], out.logits[:, -1, :])

    def _step(self, lane: _Lane) -> None:
        """Pick one token per row, publish the text, retire finished rows, run one decode pass."""
        batch = lane.batch
        assert batch is not None
        lane.steps_total += 1
        lane.rows_total += len(batch.seqs)
        now = time.monotonic()
        with self._lock:
            cancels, self._cancel_requests = self._cancel_requests, set()
        tokens = self._choose(batch)
        outcomes = [
            self._advance(seq, token, seq.request.job_id in cancels, now)
            for seq, token in zip(batch.seqs, tokens, strict=True)
        ]
        stepped = [s for s, o in zip(batch.seqs, outcomes, strict=True) if o is not _FAILED]
        advance_texts(self.host.decode_batch, [(s.detok, s.generated) for s in stepped])
        finished: dict[int, FinishReason] = {}
        for row, (seq, outcome) in enumerate(zip(batch.seqs, outcomes, strict=True)):
            if outcome is _FAILED or isinstance(outcome, FinishReason):
                finished[row] = outcome
            elif seq.detok.stopped:
                finished[row] = FinishReason.STOP
        self._publish(stepped, finished={id(batch.seqs[r]) for r in finished})
        for row, reason in finished.items():
            if reason is not _FAILED:
                self._finish(batch.seqs[row], reason, now)
        self.steps += 1
        lane.steps_since_join += 1
        self.metrics.decode_step(len(batch.seqs))
        keep = [row for row in range(len(batch.seqs)) if row not in finished]
        if not keep:
            lane.batch = None
            return
        if len(keep) < len(batch.seqs):
            batch = batch.select(keep)
        next_ids = torch.tensor([[seq.generated[-1]] for seq in batch.seqs])
        lane.batch = self._forward_step(batch, next_ids.to(self.host.device))

    def _choose(self, batch: Batch[_Sequence]) -> list[int]:
        """One token per row, each row with its own settings. Rows that ask for them record
        the chosen token's log-probability and alternatives, from the model's raw logits."""
        params = [s.request.params for s in batch.seqs]
        asking = [row for row, p in enumerate(params) if p.logprobs is not None]
        step = None
        if asking:  # before any mask
            tops = [params[row].logprobs for row in asking]
            step = RowLogprobs(model_logprobs(batch.logits, asking), tops)
        masked = self._mask_early_stops(batch)
        constrained = [row for row, s in enumerate(batch.seqs) if s.matcher is not None]
        if constrained:
            mask_rows(batch.logits, constrained, [batch.seqs[row].matcher for row in constrained])
        histories = None
        if any(p.adjusts_logits for p in params):  # penalties read each row's tokens
            vocab = batch.logits.shape[-1]
            for seq, p in zip(batch.seqs, params, strict=True):
                if p.adjusts_logits and seq.history is None:
                    seq.history = TokenHistory(seq.request.prompt_ids, vocab)
            histories = [s.history for s in batch.seqs]
        known = None
        if step is not None:  # the argmax of rows whose logits no mask changed
            changed = {*masked, *constrained}
            best = step.best_tokens()
            known = {
                asking[slot]: token for slot, token in best.items() if asking[slot] not in changed
            }
        generators = [s.generator for s in batch.seqs]
        tokens = choose_tokens(batch.logits, params, generators, histories, known)
        if histories is not None:
            for history, token in zip(histories, tokens, strict=True):
                if history is not None:
                    history.add(token)
        for row in constrained:
            batch.seqs[row].matcher.consume_token(tokens[row])
        if step is not None:
            entries = step.entries([tokens[row] for row in asking])
            for row, entry in zip(asking, entries, strict=True):
                batch.seqs[row].logprobs.append(entry)
        return tokens

    def _forward_step(self, batch: Batch, next_ids: torch.Tensor) -> Batch:
        positions = batch.positions()
        batch = batch.extended()
        mask, cache = batch.attention_inputs()
        started = time.perf_counter()
        out = self.host.forward(
            "decode",
            input_ids=next_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.host.cache_argument: cache},
        )
        self.metrics.forward_pass("decode", time.perf_counter() - started)
        return Batch(batch.seqs, batch.groups, out.logits[:, -1, :])

    def _mask_early_stops(self, batch: Batch[_Sequence]) -> list[int]:
        """Rows that have not reached their min_tokens may not pick EOS or a stop token.
        Returns the rows masked."""
        eos = self.host.eos_token_id
        masked = []
        for row, seq in enumerate(batch.seqs):
            params = seq.request.params
            if len(seq.generated) < params.min_tokens:
                stops = [*params.stop_token_ids, *([eos] if eos is not None else [])]
                batch.logits[row, stops] = float("-inf")
                masked.append(row)
        return masked

    def _advance(self, seq: _Sequence, token: int, cancelled: bool, now: float):
        """Append `token`; return why the sequence is done, _FAILED, or None to go on."""
        request = seq.request
        if cancelled:
            return FinishReason.CANCELLED
        if request.deadline is not None and now > request.deadline:
            seq.future.set_exception(JobTimeout("the job ran past its deadline"))
            return _FAILED
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token == self.host.eos_token_id and not request.params.ignore_eos:
            return FinishReason.STOP
        if token in request.params.stop_token_ids:
            return FinishReason.STOP
        if seq.matcher is not None and seq.matcher.is_error():
            error = seq.matcher.get_error()
            seq.future.set_exception(ConstraintFailed(f"the constraint failed: {error}"))
            return _FAILED
        seq.generated.append(token)
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            return FinishReason.STOP
        context_full = len(request.prompt_ids) + len(seq.generated) >= self.host.spec.context_length
        if len(seq.generated) >= request.params.max_tokens or context_full:
            return FinishReason.LENGTH
        return None

    def _publish(self, seqs: list[_Sequence], finished: set[int]) -> None:
        """Hand this step's text deltas to the publisher, all in one call; a job that does not
        publish its deltas (GenerationRequest.publishes_deltas) gets its text out whole when it
        finishes."""
        emissions = []
        created = time.time()
        for seq in seqs:
            final = id(seq) in finished
            if final:
                seq.detok.finish(self.host.decode(seq.generated))
            elif not seq.request.publishes_deltas:
                continue
            delta = seq.detok.take_delta(final)
            if delta:
                seq.deltas_sent += 1
                event = TokenEvent(
                    job_id=seq.request.job_id,
                    token_index=len(seq.generated) - 1,
                    text=delta,
                    created=created,
                    logprobs=self._logprobs_to_send(seq, final),
                )
                emissions.append(TokenEmission(seq.deltas_sent, event))
        if emissions and self.on_tokens is not None:
            self.on_tokens(emissions)

    @staticmethod
    def _logprobs_to_send(seq: _Sequence, final: bool) -> list[TokenLogprob] | None:
        """The entries a token event carries: those of the tokens since the last event. A
        delta can hold back text (a character split across tokens); its entries wait with it,
        and the last event takes the rest, the EOS's included."""
        if seq.request.params.logprobs is None:
            return None
        end = len(seq.logprobs) if final else len(seq.generated)
        entries = seq.logprobs[seq.logprobs_sent : end]
        seq.logprobs_sent = max(seq.logprobs_sent, end)
        return entries

    def _finish(self, seq: _Sequence, reason: FinishReason, now: float) -> None:
        first = seq.first_token_at
        seq.future.set_result(
            GenerationOutput(
                text=seq.detok.text,
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=len(seq.generated),
                time_to_first_token_ms=None if first is None else (first - seq.submitted_at) * 1000,
                duration_ms=(now - seq.submitted_at) * 1000,
                logprobs=seq.logprobs if seq.request.params.logprobs is not None else None,
                timings=_timings(seq, now) if seq.request.timed else None,
            )
        )

    def _drop_cancelled_waiting(self) -> None:
        with self._lock:
            cancels = set(self._cancel_requests)
        if not cancels:
            return
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.request.job_id in cancels]:
            self._waiting.remove(seq)
            self._finish(seq, FinishReason.CANCELLED, now)

    def _fail_lane(self, lane: _Lane, exc: Exception) -> None:
        if lane.batch is not None:
            for seq in lane.batch.seqs:
                if not seq.future.done():
                    seq.future.set_exception(exc)
        lane.batch = None

    def _fail_all(self, exc: Exception) -> None:
        for lane in self._lanes():
            self._fail_lane(lane, exc)
        pending = self._waiting + self._scoring
        self._scoring = []
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for seq in pending:
            if not seq.future.done():
                seq.future.set_exception(exc)
        self._waiting = []


def _timings(seq: _Sequence, now: float) -> EngineTimings:
    lane = seq.lane
    steps = lane.steps_total - seq.steps_at_join if lane is not None else 0
    rows = lane.rows_total - seq.rows_at_join if lane is not None else 0
    return EngineTimings(
        submitted=seq.submitted_at,
        admitted=seq.admitted_at,
        prefilled=seq.prefilled_at,
        finished=now,
        steps=steps,
        mean_batch_size=rows / steps if steps else 0.0,
        last_batch_size=len(lane.batch.seqs) if lane is not None and lane.batch else 0,
    )
