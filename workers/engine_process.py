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
import ctypes
import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import structlog
import torch

from llmq.events import TokenEvent
from llmq.logs import configure_logging
from llmq.publisher import TokenEmission
from llmq.registry import Device, ModelSpec
from workers.engine import EngineStopped, GenerationEngine, GenerationRequest
from workers.host import ModelFacts, ModelHost, TokenizerHost
from workers.metrics import EngineMetrics
from workers.scoring import ScoreRequest

log = structlog.get_logger(__name__)

# The worker process's exit status when its engine process died (EX_SOFTWARE).
ENGINE_LOST_EXIT = 70
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class EngineConfig:
    """What the engine process loads, and how its engine batches."""

    model: ModelSpec
    device: Device
    data_dir: Path
    engine_options: dict[str, Any] = field(default_factory=dict)  # GenerationEngine's keywords
    log_level: str = "INFO"
    log_json: bool = True
    torch_threads: int | None = None  # None: default_torch_threads()


# -- messages ---------------------------------------------------------------------------------


class _Submit(NamedTuple):
    key: int  # the worker process's name for the job's future
    request: GenerationRequest | ScoreRequest


class _Cancel(NamedTuple):
    job_id: uuid.UUID


class _Stop(NamedTuple):
    timeout: float


class _Ready(NamedTuple):
    facts: ModelFacts


class _LoadFailed(NamedTuple):
    error: str


class _Ended(NamedTuple):
    key: int
    output: Any  # GenerationOutput or ScoreOutput, None when it failed
    error: BaseException | None


# A token delta: (delta number, job id bytes, token index, text, created).
_Delta = tuple[int, bytes, int, str, float | None]


class _CycleReport(NamedTuple):
    batch_sizes: list[int]  # rows of each decode step
    passes: list[tuple[str, float]]  # (kind, seconds) of each forward pass
    deltas: list[_Delta]
    ended: list[_Ended]


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
        self.metrics = EngineMetrics(self)
        self._keys = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._outbox: queue.SimpleQueue[_Submit | _Cancel | _Stop] = queue.SimpleQueue()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float | None = None) -> ModelFacts:
        """Start the engine process and wait until its model is loaded (as long as it lives,
        unless `timeout`); returns what it loaded. RuntimeError if it could not load it."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        # The kernel's parent-death signal follows the thread that started the child: only the
        # main thread is sure to live as long as this process.
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
            self._outbox.put(_Stop(timeout))
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
        self._outbox.put(_Cancel(job_id))

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
            self._outbox.put(_Submit(key, request))
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
        if isinstance(hello, _LoadFailed):
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
                    if isinstance(command, _Submit):
                        self._resolve(_Ended(command.key, None, exc))
            if any(isinstance(command, _Stop) for command in commands):
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

    def _apply(self, report: _CycleReport) -> None:
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
                        ),
                    )
                    for number, job_id, index, text, created in report.deltas
                ]
            )
        for ended in report.ended:
            self._resolve(ended)

    def _resolve(self, ended: _Ended) -> None:
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


# -- the engine process -----------------------------------------------------------------------


class _Reporter:
    """Collects what one engine cycle produced and sends it as one message: the engine's
    on_tokens, its observer (decode steps, forward passes) and its on_cycle hook."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # The engine thread reports; the main thread too, for a job refused at submission and
        # for the last report after the engine stops.
        self._lock = threading.Lock()
        self._batch_sizes: list[int] = []
        self._passes: list[tuple[str, float]] = []
        self._deltas: list[_Delta] = []
        self._ended: list[_Ended] = []

    def decode_step(self, batch_size: int) -> None:
        with self._lock:
            self._batch_sizes.append(batch_size)

    def forward_pass(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._passes.append((kind, seconds))

    def tokens(self, emissions: list[TokenEmission]) -> None:
        deltas = [
            (e.number, e.event.job_id.bytes, e.event.token_index, e.event.text, e.event.created)
            for e in emissions
        ]
        with self._lock:
            self._deltas.extend(deltas)

    def ended(self, key: int, future: Future) -> None:
        error = future.exception()
        if error is not None:
            outcome = _Ended(key, None, _portable(error))
        else:
            outcome = _Ended(key, future.result(), None)
        with self._lock:
            self._ended.append(outcome)

    def send(self) -> None:
        with self._lock:
            if not (self._batch_sizes or self._passes or self._deltas or self._ended):
                return
            report = _CycleReport(self._batch_sizes, self._passes, self._deltas, self._ended)
            self._batch_sizes, self._passes, self._deltas, self._ended = [], [], [], []
            try:
                self._conn.send(report)
            except OSError:
                _worker_gone()
            except Exception:  # a report that cannot be sent strands its jobs: fail loudly
                log.exception("the engine process could not report to the worker; exiting")
                os._exit(1)

    def send_message(self, message: Any) -> None:
        with self._lock:
            self._conn.send(message)


def default_torch_threads() -> int | None:
    """One fewer than the cores this process may use, at least one; None (torch's own choice)
    where OMP_NUM_THREADS is set. The worker process, bound by its GIL, needs at most one core,
    and OpenMP threads that meet at the end of every operation all wait whenever one of them
    waits for its core. On the 2-core machine, with other work on it, a 64-row stories260K
    decode pass took 4.6 and 5.5 ms alone with one thread against 13.0 and 14.3 ms with two
    (bench.decode_step, two runs of 9 rounds), and in a worker serving 64 clients through an
    engine process 6.5-9.6 ms against 10.4-15.8 ms (4 alternated rounds, medians of 3), for
    2,420-3,797 tokens/s against 2,116-3,232. llama-25m, compute-bound, came out even there
    (100 and 117 ms a pass with two threads, 123 and 109 ms with one)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling; else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def run_engine_process(
    config: EngineConfig, conn: Connection, worker_pid: int, die_with_worker: bool
) -> None:
    """The engine process's main: load the model, start the engine, serve the worker's commands
    until it says stop or is gone."""
    # Signals to the whole group are the worker's to handle; it stops this process last.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if die_with_worker and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:  # the worker died before the line above
        os._exit(0)
    configure_logging(config.log_level, config.log_json)
    threads = config.torch_threads or default_torch_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # before the engine thread's first operation reads it
    reporter = _Reporter(conn)
    try:
        host = ModelHost.load(config.model, config.device, config.data_dir)
    except Exception as exc:
        log.exception("the engine process could not load its model")
        reporter.send_message(_LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    engine = GenerationEngine(
        host,
        **config.engine_options,
        on_tokens=reporter.tokens,
        observer=reporter,
        on_cycle=reporter.send,
    )
    reporter.send_message(_Ready(host.facts()))
    engine.start()
    log.info("engine process serving", pid=os.getpid(), torch_threads=torch.get_num_threads())
    _serve(conn, engine, reporter)


def _serve(conn: Connection, engine: GenerationEngine, reporter: _Reporter) -> None:
    while True:
        try:
            commands = conn.recv()
        except (EOFError, OSError):
            _worker_gone()
        for command in commands:
            if isinstance(command, _Submit):
                _submit(engine, reporter, command)
            elif isinstance(command, _Cancel):
                engine.cancel(command.job_id)
            elif isinstance(command, _Stop):
                engine.stop(command.timeout)
                reporter.send()  # the jobs the stop failed
                return


def _submit(engine: GenerationEngine, reporter: _Reporter, command: _Submit) -> None:
    request = command.request
    try:
        if isinstance(request, ScoreRequest):
            future = engine.submit_score(request)
        else:
            future = engine.submit(request)
    except Exception as exc:  # refused at the door: tell its caller, like any other failure
        future = Future()
        future.set_exception(exc)
    future.add_done_callback(partial(reporter.ended, command.key))


def _worker_gone() -> NoReturn:
    """The worker process ended without a stop: nobody waits for this one's work."""
    log.warning("the worker process is gone; the engine process exits")
    os._exit(0)
