"""The remote model's engine: the same surface as the model's engine (submit, cancel,
active_job_ids, stop), each job sent upstream from a thread of its own.

A job's attempts, until one succeeds or the job's deadline passes:
1. wait while the breaker is open (a job that waits is not sent, so an outage does not fail
   the jobs in a burst); when it may close again, one attempt of one worker is its probe;
2. wait for one of the model's upstream slots (workers/remote/slots.py);
3. stream the completion, relaying its text into the job's event stream as it comes: a job's
   first text at once, the rest at the next relay tick, where every job's new text since the
   last tick goes to Redis together (one round trip for all of them, not one per delta).
Transient failures are retried with exponential backoff and jitter (tenacity), no sooner than
the upstream's Retry-After. A retried job's stream goes on where its text agrees with what was
already relayed (a greedy or seeded job gets the same text again); where it does not, the stream
starts over, as it does after a lost worker.
"""

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pybreaker
import structlog
from redis import Redis
from redis.exceptions import RedisError
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential_jitter

from llmq import tracing
from llmq.circuit_breakers import circuit_breaker
from llmq.events import TokenEvent
from llmq.protocol import ErrorCategory, FinishReason, SamplingParams
from llmq.publisher import TokenEmission
from llmq.registry import ModelSpec
from workers.engine_jobs import (
    GenerationOutput,
    JobFailed,
    JobTimeout,
    ScoreOutput,
    ScoreRequest,
    publishes_deltas,
)
from workers.remote import metrics
from workers.remote.slots import UpstreamSlots
from workers.remote.upstream import (
    Streamed,
    UpstreamClient,
    UpstreamError,
    UpstreamRefused,
    UpstreamTransient,
    request_body,
)

log = structlog.get_logger(__name__)

BREAKER_POLL_S = 0.2
# Text waits at most this long for the relay tick that sends it with every other job's: an event
# costs the worker, Redis and every reader of the stream alike, a round trip to Redis costs the
# worker as much as the few events it carries, and a reader sees no difference below a few tens
# of milliseconds. The first text of a job goes at once.
RELAY_EVERY_S = 0.025
_backoff = wait_exponential_jitter(initial=0.25, max=5.0, jitter=0.5)


class UpstreamUnavailable(JobFailed):
    category = ErrorCategory.UPSTREAM_UNAVAILABLE


@dataclass(frozen=True)
class UpstreamRequest:
    job_id: uuid.UUID
    job_input: dict  # the job row's input: its prompt, or its prompt's token ids
    params: SamplingParams
    deadline: float  # time.monotonic() value
    priority: int = 0
    trace_context: str | None = None  # the job's span, when it is traced
    stream_tokens: bool = True  # the job row's: see engine_jobs.publishes_deltas


@dataclass
class _Call:
    """A job in flight, across its attempts."""

    request: "UpstreamRequest | ScoreRequest"
    started: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    relayed: str = ""  # the text its stream has carried so far
    deltas: int = 0  # token events published
    first_text_at: float | None = None  # time.monotonic()
    attempt_text: list[str] = field(default_factory=list)  # the attempt's deltas so far

    @property
    def publishes_deltas(self) -> bool:
        request = self.request  # a scoring call makes no text to publish
        return isinstance(request, UpstreamRequest) and publishes_deltas(
            request.stream_tokens, request.priority
        )

    @property
    def deadline(self) -> float:
        return self.request.deadline if self.request.deadline is not None else float("inf")


class RemoteEngine:
    def __init__(
        self,
        spec: ModelSpec,
        redis: Redis,
        on_tokens: Callable[[list[TokenEmission]], None],
        on_reset: Callable[[uuid.UUID], None],
    ) -> None:
        assert spec.remote is not None
        self.spec = spec
        self.upstream = spec.remote
        self.redis = redis
        self.on_tokens = on_tokens
        self.on_reset = on_reset
        self.client = UpstreamClient(self.upstream)
        self.breaker = circuit_breaker(
            spec,
            redis,
            exclude=[UpstreamRefused, JobTimeout],  # the request's fault, or the job's deadline
            listeners=[metrics.BreakerMetrics(spec.id)],
        )
        # A lease outlives any request that still streams: one silent for read_timeout_s fails.
        lease_s = self.upstream.connect_timeout_s + self.upstream.read_timeout_s + 30
        self.slots = UpstreamSlots(redis, spec.id, self.upstream.max_concurrency, lease_s)
        self._probe_key = f"llmq:breaker-probe:{spec.id}"
        self._executor = ThreadPoolExecutor(
            self.upstream.max_concurrency, thread_name_prefix="llmq-upstream"
        )
        self._calls: dict[uuid.UUID, _Call] = {}
        self._lock = threading.Lock()
        # Jobs with text that waits for the next relay tick. The lock orders every publish of
        # a job's events: a tick's, and its thread's first and last.
        self._unrelayed: dict[uuid.UUID, _Call] = {}
        self._relay_lock = threading.Lock()
        self._relay_due = threading.Event()
        self._stopped = False
        threading.Thread(target=self._relay_ticks, name="llmq-relay", daemon=True).start()

    # -- the engine's surface -----------------------------------------------------------------

    def start(self) -> None:
        """Tell in the log whether the upstream answers; a worker starts either way, and its
        jobs wait for the upstream (the breaker) rather than fail."""
        try:
            names = self.client.model_names()
        except (JobFailed, UpstreamTransient) as exc:
            log.error("upstream unavailable at start", model=self.spec.id, error=str(exc))
            return
        if self.upstream.model not in names:
            log.error(
                "the upstream does not serve this model",
                model=self.spec.id,
                upstream_model=self.upstream.model,
                upstream_models=names[:20],
            )
        else:
            log.info("upstream answers", model=self.spec.id, base_url=self.upstream.base_url)

    def stop(self, timeout: float = 10.0) -> None:
        """At worker shutdown, once Celery's threads have ended their tasks (a job still in
        flight here is left to the reconciler, as a local engine's is)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self._stopped = True
        self._relay_due.set()

    def submit(self, request: UpstreamRequest) -> Future:
        """A generation job: its completion streamed from the upstream (GenerationOutput)."""
        return self._submit(_Call(request), self._generate)

    def submit_score(self, request: ScoreRequest) -> Future:
        """A scoring job: its continuations' log-likelihoods from the upstream's echoed prompt
        log-probabilities (ScoreOutput), for upstreams that give them (prompt_logprobs)."""
        return self._submit(_Call(request), self._score)

    def _submit(self, call: "_Call", send: Callable) -> Future:
        job_id = call.request.job_id
        with self._lock:
            self._calls[job_id] = call
        future = self._executor.submit(self._run, call, send)
        future.add_done_callback(lambda _: self._forget(job_id))
        return future

    def cancel(self, job_id: uuid.UUID) -> None:
        with self._lock:
            call = self._calls.get(job_id)
        if call is not None:
            call.cancelled.set()

    def active_job_ids(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._calls)

    def _forget(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._calls.pop(job_id, None)

    # -- one job ------------------------------------------------------------------------------

    def _run(self, call: _Call, send: Callable):
        """`send`'s result, retried while the job's deadline allows."""
        retrying = Retrying(
            retry=retry_if_exception_type((UpstreamTransient, pybreaker.CircuitBreakerError)),
            wait=_wait_before_retry,
            stop=lambda state: time.monotonic() + (state.upcoming_sleep or 0) >= call.deadline,
            before_sleep=lambda state: log.info(
                "upstream attempt failed; retrying",
                job_id=str(call.request.job_id),
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else None,
                retry_in_s=round(state.upcoming_sleep or 0, 2),
            ),
            reraise=True,
        )
        try:
            # The job's span is current: each attempt's request (the httpx instrumentation's
            # client span) is its child.
            with tracing.attached(call.request.trace_context):
                for attempt in retrying:
                    with attempt:
                        return self._attempt(call, send)
        except (UpstreamTransient, pybreaker.CircuitBreakerError) as exc:
            raise UpstreamUnavailable(
                f"the upstream did not answer before the job's deadline; last: {exc}"
            ) from exc
        raise AssertionError("unreachable: tenacity returns or raises")

    def _attempt(self, call: _Call, send: Callable):
        request = call.request
        member = f"{request.job_id}:{time.monotonic_ns()}"
        probing = self._wait_for_breaker(call, member)
        try:
            if not self.slots.acquire(member, call.deadline, call.cancelled.is_set):
                if call.cancelled.is_set():
                    return _cancelled(call)
                raise UpstreamUnavailable(
                    f"none of the upstream's {self.upstream.max_concurrency} slots "
                    "(max_concurrency) came free before the job's deadline"
                )
            try:
                with self.breaker.calling():
                    result = self._counted(send, call, member)
            finally:
                self.slots.release(member)
        finally:
            if probing:
                self._end_probe(member)
        return result if result is not None else _cancelled(call)

    def _counted(self, send: Callable, call: _Call, member: str):
        """`send`'s result, the request counted by outcome and timed, whatever its kind."""
        sent = time.monotonic()
        outcome = "error"
        try:
            result = send(call, member)
            outcome = "ok" if result is not None else "cancelled"
            return result
        except UpstreamTransient:
            outcome = "transient"
            raise
        except UpstreamRefused:
            outcome = "refused"
            raise
        finally:
            metrics.UPSTREAM_REQUESTS.labels(self.spec.id, outcome).inc()
            metrics.UPSTREAM_SECONDS.labels(self.spec.id).observe(time.monotonic() - sent)

    def may_send(self) -> bool:
        """Whether a request may go upstream now: the breaker is closed, or a probe is due."""
        state = self.breaker.current_state
        return state == pybreaker.STATE_CLOSED or self._probe_due(state)

    def _probe_due(self, state: str) -> bool:
        if state == pybreaker.STATE_HALF_OPEN:
            return True
        opened_at = self.breaker._state_storage.opened_at  # pybreaker has no public reader
        reset_s = self.upstream.circuit_breaker.reset_timeout_s
        return opened_at is None or time.time() >= opened_at.timestamp() + reset_s

    def _wait_for_breaker(self, call: _Call, member: str) -> bool:
        """Wait until the breaker lets this attempt go; True if it goes as the probe. Raises
        UpstreamUnavailable at the job's deadline (returns on cancellation: it is told later)."""
        while True:
            state = self.breaker.current_state
            if state == pybreaker.STATE_CLOSED:
                return False
            if self._probe_due(state) and self._take_probe(member):
                return True
            if call.cancelled.is_set():
                return False
            if time.monotonic() >= call.deadline:
                fail_max = self.upstream.circuit_breaker.fail_max
                raise UpstreamUnavailable(
                    f"the upstream's circuit breaker stayed {state} until the job's deadline "
                    f"(it opens after {fail_max} failed requests in a row)"
                )
            time.sleep(BREAKER_POLL_S)

    def _take_probe(self, member: str) -> bool:
        ttl = int(self.upstream.connect_timeout_s + self.upstream.read_timeout_s) + 1
        try:
            return bool(self.redis.set(self._probe_key, member, nx=True, ex=ttl))
        except RedisError:
            return True

    def _end_probe(self, member: str) -> None:
        try:
            if self.redis.get(self._probe_key) == member.encode():
                self.redis.delete(self._probe_key)
        except RedisError:
            pass  # it lapses

    def _generate(self, call: _Call, member: str) -> GenerationOutput | None:
        streamed = self._stream(call, member)
        return None if streamed is None else self._output(call, streamed)

    def _stream(self, call: _Call, member: str) -> Streamed | None:
        request = call.request
        remaining = request.deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout("the job reached its deadline before the upstream answered")
        sent = time.monotonic()
        renewed = [sent]
        with self._relay_lock:
            call.attempt_text = attempt_text = []

        def on_text(delta: str) -> None:
            now = time.monotonic()
            if not attempt_text:
                metrics.UPSTREAM_FIRST_TEXT.labels(self.spec.id).observe(now - sent)
                call.first_text_at = call.first_text_at or now
            with self._relay_lock:
                attempt_text.append(delta)
                if not call.publishes_deltas:
                    pass  # nobody reads its stream as it comes: its text goes at its end
                elif call.deltas == 0:  # the job's first text
                    text, index = "".join(attempt_text), len(attempt_text) - 1
                    self._publish([self._emission(call, text, index)])
                elif call.request.job_id not in self._unrelayed:
                    self._unrelayed[call.request.job_id] = call
                    self._relay_due.set()
            if now - renewed[0] > self.slots.lease_s / 3:
                renewed[0] = now
                self.slots.renew(member)
            if now >= request.deadline:
                raise JobTimeout("the job ran past its deadline while the upstream streamed")

        body = request_body(self.upstream, request.job_input, request.params)
        read_timeout = min(self.upstream.read_timeout_s, remaining)
        try:
            return self.client.complete(body, read_timeout, on_text, call.cancelled.is_set)
        finally:
            # What still waits is left: a finished stream relays its whole text at its end
            # (_output), a failed attempt's retry relays it again, and a cancelled job ends
            # with what was relayed.
            with self._relay_lock:
                self._unrelayed.pop(call.request.job_id, None)

    def _score(self, call: _Call, member: str) -> ScoreOutput:
        """Each pair's continuation log-likelihood and whether greedy decoding gives it, from
        the log-probabilities of its row (context + continuation, the last max_length + 1
        tokens, as lm-eval reads them) echoed by the upstream: one request for the job's rows.
        One token is asked to be generated, as lm-eval's own API clients ask, and ignored."""
        request: ScoreRequest = call.request  # type: ignore[assignment]
        remaining = request.deadline - time.monotonic() if request.deadline else None
        if remaining is not None and remaining <= 0:
            raise JobTimeout("the job reached its deadline before the upstream answered")
        rows = [(c + n)[-(request.max_length + 1) :] for c, n in request.pairs]
        body = {
            "model": self.upstream.model,
            "prompt": rows,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        timeout = min(self.upstream.read_timeout_s, remaining or self.upstream.read_timeout_s)
        answer = self.client.score(body, timeout)
        choices = sorted(answer.choices, key=lambda choice: choice.index)
        if len(choices) != len(rows):
            raise UpstreamError(
                f"the upstream answered {len(choices)} choices for {len(rows)} rows"
            )
        loglikelihoods, greedy = [], []
        for (_, continuation), row, choice in zip(request.pairs, rows, choices, strict=True):
            wanted = range(len(row) - min(len(continuation), len(row) - 1), len(row))
            try:
                picked = [choice.logprobs.token_logprobs[i] for i in wanted]
                tokens = [choice.logprobs.tokens[i] for i in wanted]
                tops = [choice.logprobs.top_logprobs[i] for i in wanted]
            except (IndexError, TypeError) as exc:
                raise UpstreamError(
                    f"the upstream echoed {len(choice.logprobs.token_logprobs)} log-probabilities "
                    f"for a prompt of {len(row)} tokens: it does not echo prompts as asked"
                ) from exc
            if any(value is None for value in picked) or any(not top for top in tops):
                raise UpstreamError("the upstream gave no log-probability for prompt tokens")
            loglikelihoods.append(float(sum(picked)))  # type: ignore[arg-type]
            chosen = zip(tops, tokens, strict=True)
            greedy.append(all(max(top, key=top.get) == token for top, token in chosen))
        return ScoreOutput(
            loglikelihoods,
            greedy,
            input_tokens=sum(len(row) for row in rows),
            duration_ms=(time.monotonic() - call.started) * 1000,
        )

    def _relay_ticks(self) -> None:
        """Every RELAY_EVERY_S while jobs have text waiting: each job's new text since the last
        tick as one event, all of them in one publish."""
        while True:
            self._relay_due.wait()
            if self._stopped:
                return
            time.sleep(RELAY_EVERY_S)
            with self._relay_lock:
                calls, self._unrelayed = self._unrelayed, {}
                self._relay_due.clear()
                self._publish(
                    [
                        self._emission(call, "".join(call.attempt_text), len(call.attempt_text) - 1)
                        for call in calls.values()
                    ]
                )

    def _publish(self, emissions: "list[TokenEmission | None]") -> None:
        """Hand the events to the publisher, in one batch (under _relay_lock)."""
        if found := [emission for emission in emissions if emission is not None]:
            self.on_tokens(found)

    def _emission(self, call: _Call, text: str, token_index: int) -> TokenEmission | None:
        """The event of what `text` (the attempt's text so far, `token_index` + 1 upstream
        deltas, about a token each) adds to the job's stream (under _relay_lock)."""
        if text.startswith(call.relayed):
            added = text[len(call.relayed) :]
        elif call.relayed.startswith(text):
            return None  # a retry still behind what was relayed
        else:  # a retry that took another turn: its stream starts over
            self.on_reset(call.request.job_id)
            call.relayed, call.deltas, added = "", 0, text
        if not added:
            return None
        call.deltas += 1
        call.relayed += added
        event = TokenEvent(
            job_id=call.request.job_id, token_index=token_index, text=added, created=time.time()
        )
        return TokenEmission(call.deltas, event)

    def _output(self, call: _Call, streamed: Streamed) -> GenerationOutput:
        usage = streamed.usage
        last = (usage.completion_tokens if usage else streamed.deltas) - 1
        with self._relay_lock:
            if not streamed.text.startswith(call.relayed):  # a retry ended short of the stream
                self.on_reset(call.request.job_id)
                call.relayed, call.deltas = "", 0
            # What waited for a tick, if anything: before the job's final event.
            self._publish([self._emission(call, streamed.text, last)])
        return GenerationOutput(
            text=streamed.text,
            finish_reason=streamed.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else streamed.deltas,
            time_to_first_token_ms=(
                (call.first_text_at - call.started) * 1000 if call.first_text_at else None
            ),
            duration_ms=(time.monotonic() - call.started) * 1000,
        )


def _cancelled(call: _Call) -> GenerationOutput:
    return GenerationOutput(
        call.relayed,
        FinishReason.CANCELLED,
        0,
        call.deltas,
        None,
        (time.monotonic() - call.started) * 1000,
    )


def _wait_before_retry(state: RetryCallState) -> float:
    """Exponential backoff with jitter, never sooner than the upstream's Retry-After; a breaker
    that is open needs no backoff (the next attempt waits for it)."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, pybreaker.CircuitBreakerError):
        return 0.0
    backoff = _backoff(state)
    if isinstance(error, UpstreamTransient) and error.retry_after_s is not None:
        return max(backoff, error.retry_after_s)
    return backoff
