"""The batching engine in a process of its own, and the stand-in a worker process holds for it.

Why: inside a worker process the engine thread shares one GIL with Celery's consumer and task
threads, the result writer and the token publisher, and waits for it between the operations
of every forward pass. So the engine process (started with "spawn", which CUDA survives) loads
the model and runs an unchanged GenerationEngine, and the worker process keeps the tokenizer
and everything that talks to Postgres and Redis. vLLM's V1 moved its EngineCore out of the
serving process for the same reason. `python -m bench.decode_step` (stories260K, 64 clients
× 64 tokens, 9 rounds, 2 cores shared with the API, the clients and other work): a 64-row
decode pass took 5.4 and 7.4 ms in a worker with an engine process against 6.6 and 8.7 ms with
the engine thread at as many torch threads (1), and 11.9 and 14.5 ms with the engine thread at
torch's default of two, as before; the engine alone in a process took 4.6 and 5.5 ms.

    worker process                                      engine process
    task threads ─ submit, cancel ─▶ sender thread ═══▶ main thread ─▶ GenerationEngine
    futures, metrics, publisher ◀── reader thread ◀═══ engine thread, after each cycle

Traffic, one pickled message each way at a time, on a multiprocessing Pipe (a Unix socket):
- worker → engine: every command waiting (submits, cancels, stop) in one message;
- engine → worker: at most one message per engine cycle (a decode step of each lane with
  work, its admissions and a scoring turn), sent by the engine thread as the cycle ends: the
  cycle's decode batch sizes and forward-pass timings, its token deltas, then the jobs that
  ended (an output or an exception). The worker process records the metrics, hands the deltas
  to the token publisher, then resolves the futures, so a job's final event still follows
  its tokens, and Redis is never touched from the engine process.
A Pipe is the cheapest channel that needs nothing more. Measured by hand on the 2-core machine
(medians of 2,000): a 64-row report costs the engine thread 41 µs, 15 µs to turn the deltas
into tuples and 26 µs to pickle and write 2.9 KB (0.6% of a 6.5 ms step), and a round trip
through both processes 20-45 µs; shared memory or ZeroMQ (not installed) could save a part of
those 41 µs only. Deltas travel as tuples because pickling 64 TokenEmissions (pydantic events
with UUIDs) took 169 µs against 5 µs; the worker process builds the events again.

Failures. An engine process that dies (killed, out of memory) takes the worker process with
it at once (os._exit(ENGINE_LOST_EXIT), after an error line): the broker redelivers its
unacknowledged messages and the API's reconciler queues its running jobs again, as for any
killed worker, instead of a worker taking jobs with no model. An engine process ends with its
worker process: at the pipe's end of file, or at once through PR_SET_PDEATHSIG (Linux). It
ignores SIGINT and SIGTERM: a Ctrl-C or a supervisor's SIGTERM to the whole process group must
let the worker drain the jobs it holds, and the worker stops its engine last.

Deadlines are time.monotonic() values: one clock (CLOCK_MONOTONIC) for both processes. A job's
time to first token and duration are counted from when the engine process received it.
"""

import atexit
import itertools
import multiprocessing
import os
import queue
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection

import structlog

from llmq.events import TokenEvent
from llmq.publisher import TokenEmission
from workers.engine import EngineStopped, GenerationRequest
from workers.engine_main import run_engine_process
from workers.engine_messages import (
    Cancel,
    CycleReport,
    Ended,
    EngineConfig,
    LoadFailed,
    Stop,
    Submit,
)
from workers.host import ModelFacts, TokenizerHost
from workers.metrics import EngineMetrics
from workers.scoring import ScoreRequest
from workers.spare_engines import take_spare

log = structlog.get_logger(__name__)

# The worker process's exit status when its engine process died (EX_SOFTWARE).
ENGINE_LOST_EXIT = 70


# -- the worker process's side ----------------------------------------------------------------


@dataclass
class _Pending:
    job_id: uuid.UUID
    future: Future
    generation: bool  # a generation job, which active_job_ids() reports; else a scoring job


class EngineProcess:
    """GenerationEngine's surface (start, stop, submit, submit_score, cancel, active_job_ids),
    served by an engine process. Records the engine's metrics in this process, where the
    worker's /metrics endpoint reads them, and hands token deltas to `on_tokens`."""

    def __init__(
        self,
        host: TokenizerHost,
        config: EngineConfig,
        on_tokens: Callable[[list[TokenEmission]], None] | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self.on_tokens = on_tokens
        self.facts: ModelFacts | None = None  # what the engine process loaded, once it is ready
        self.steps = 0  # decode steps the engine has reported
        self.metrics = EngineMetrics(
            host.spec.id, host.spec.queue(host.device), self.active_job_ids
        )
        self._keys = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._outbox: queue.SimpleQueue[Submit | Cancel | Stop] = queue.SimpleQueue()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float | None = None, spare: bool = False) -> ModelFacts:
        """Start the engine process and wait until its model is loaded (as long as it lives,
        unless `timeout`); returns what it loaded. RuntimeError if it could not load it. With
        `spare`, a spare engine process loads it when one waits (workers/spare_engines.py)."""
        taken = take_spare() if spare else None
        if taken is not None:
            process, ours = taken
            ours.send(self.config)
        else:
            context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            # The kernel's parent-death signal follows the thread that started the child: only
            # the main thread is sure to live as long as this process.
            die_with_us = threading.current_thread() is threading.main_thread()
            process = context.Process(
                target=run_engine_process,
                args=(self.config, theirs, os.getpid(), die_with_us),
                name=f"llmq-engine-{self.host.spec.id}",
            )
            process.start()
            theirs.close()  # so that the engine process's death reads as end of file here
        self._process, self._conn = process, ours
        # A worker that exits without stop() must not wait for (or leave behind) its engine.
        atexit.register(self._kill_at_exit)
        try:
            facts = self.facts = self._wait_until_ready(timeout)
        except BaseException:
            self._kill()
            raise
        self._reader = threading.Thread(target=self._read, name="llmq-engine-reader", daemon=True)
        self._reader.start()
        sender = threading.Thread(target=self._send, name="llmq-engine-sender", daemon=True)
        sender.start()
        log.info("engine process ready", pid=process.pid, model=self.host.spec.id)
        return facts

    def stop(self, timeout: float = 10.0) -> None:
        """Let the engine end its jobs (they fail with EngineStopped), then its process."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._process is not None:
            self._outbox.put(Stop(timeout))
            self._process.join(timeout + 5)
            if self._process.is_alive():
                log.warning("the engine process did not stop in time; killing it")
                self._kill()
        if self._reader is not None:
            self._reader.join(5)
        with self._lock:
            left, self._pending = list(self._pending.values()), {}
        for pending in left:
            pending.future.set_exception(EngineStopped("the worker is shutting down"))

    def submit(self, request: GenerationRequest) -> Future:
        return self._hand_over(request, generation=True)

    def submit_score(self, request: ScoreRequest) -> Future:
        """Score continuations; runs between decode steps, batched with other scoring jobs."""
        return self._hand_over(request, generation=False)

    def cancel(self, job_id: uuid.UUID) -> None:
        """The job leaves its batch at the engine's next step boundary."""
        self._outbox.put(Cancel(job_id))

    def active_job_ids(self) -> list[uuid.UUID]:
        """Generation jobs handed over whose outcome has not come back."""
        with self._lock:
            return [p.job_id for p in self._pending.values() if p.generation]

    def _hand_over(self, request: GenerationRequest | ScoreRequest, generation: bool) -> Future:
        future: Future = Future()
        key = next(self._keys)
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._pending[key] = _Pending(request.job_id, future, generation)
        if stopping:
            future.set_exception(EngineStopped("the worker is shutting down"))
        else:
            self._outbox.put(Submit(key, request))
        return future

    def _wait_until_ready(self, timeout: float | None) -> ModelFacts:
        assert self._process is not None and self._conn is not None
        waited = 0.0
        while not self._conn.poll(0.5):
            waited += 0.5
            if not self._process.is_alive():
                break
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"the engine process did not load its model in {timeout:.0f}s")
        try:
            hello = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(
                f"the engine process exited with {self._process.exitcode} before its model "
                "loaded; its log lines say why"
            ) from None
        if isinstance(hello, LoadFailed):
            raise RuntimeError(f"the engine process could not load the model: {hello.error}")
        return hello.facts

    def _send(self) -> None:
        """The commands waiting go in one message; a stop is the last."""
        assert self._conn is not None
        while True:
            commands = [self._outbox.get()]
            while True:
                try:
                    commands.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._conn.send(commands)
            except OSError:
                return  # the engine process is gone: the reader ends this process
            except Exception as exc:  # requests always pickle; if one did not, fail its jobs
                log.exception("engine commands could not be sent")
                for command in commands:
                    if isinstance(command, Submit):
                        self._resolve(Ended(command.key, None, exc))
            if any(isinstance(command, Stop) for command in commands):
                return

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                report = self._conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._apply(report)
            except Exception:  # never the reader: it resolves every later job
                log.exception("an engine report could not be applied")
        if not self._stopping:
            self._engine_lost()

    def _apply(self, report: CycleReport) -> None:
        for size in report.batch_sizes:
            self.metrics.decode_step(size)
        for kind, seconds in report.passes:
            self.metrics.forward_pass(kind, seconds)
        self.steps += len(report.batch_sizes)
        if report.deltas and self.on_tokens is not None:
            self.on_tokens(
                [
                    TokenEmission(
                        number,
                        TokenEvent(
                            job_id=uuid.UUID(bytes=job_id),
                            token_index=index,
                            text=text,
                            created=created,
                            logprobs=logprobs,
                        ),
                    )
                    for number, job_id, index, text, created, logprobs in report.deltas
                ]
            )
        for ended in report.ended:
            self._resolve(ended)

    def _resolve(self, ended: Ended) -> None:
        with self._lock:
            pending = self._pending.pop(ended.key, None)
        if pending is None:
            return
        if ended.error is not None:
            pending.future.set_exception(ended.error)
        else:
            pending.future.set_result(ended.output)

    def _engine_lost(self) -> None:
        """No model any more: end this worker process now, so that its jobs run elsewhere."""
        assert self._process is not None
        self._process.join(1)
        log.critical(
            "the engine process died; the worker exits so that its jobs are delivered again",
            pid=self._process.pid,
            exitcode=self._process.exitcode,
            jobs=len(self._pending),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ENGINE_LOST_EXIT)

    def _kill_at_exit(self) -> None:
        with self._lock:
            self._stopping = True  # its end is no news
        self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
