"""The engine process's side of workers/engine_process.py: it loads the model, runs a
GenerationEngine, serves the worker process's commands and reports each engine cycle."""

import ctypes
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import structlog
import torch

from llmq.heap import settle
from llmq.logs import configure_logging
from llmq.publisher import TokenEmission
from llmq.settings import get_settings
from workers.engine import GenerationEngine
from workers.engine_messages import (
    Cancel,
    CycleReport,
    Delta,
    Ended,
    EngineConfig,
    LoadFailed,
    Ready,
    Stop,
    Submit,
)
from workers.host import ModelHost
from workers.scoring import ScoreRequest

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl's option: a signal for this process when its parent dies


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
        self._deltas: list[Delta] = []
        self._ended: list[Ended] = []

    def decode_step(self, batch_size: int) -> None:
        with self._lock:
            self._batch_sizes.append(batch_size)

    def forward_pass(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._passes.append((kind, seconds))

    def tokens(self, emissions: list[TokenEmission]) -> None:
        deltas = [
            (
                e.number,
                e.event.job_id.bytes,
                e.event.token_index,
                e.event.text,
                e.event.created,
                e.event.logprobs,
            )
            for e in emissions
        ]
        with self._lock:
            self._deltas.extend(deltas)

    def ended(self, key: int, future: Future) -> None:
        error = future.exception()
        if error is not None:
            outcome = Ended(key, None, _portable(error))
        else:
            outcome = Ended(key, future.result(), None)
        with self._lock:
            self._ended.append(outcome)

    def send(self) -> None:
        with self._lock:
            if not (self._batch_sizes or self._passes or self._deltas or self._ended):
                return
            report = CycleReport(self._batch_sizes, self._passes, self._deltas, self._ended)
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


def _cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_torch_threads() -> int | None:
    """Torch threads of a decode pass: one fewer than the cores this process may use, at least
    one; None (torch's own choice) where OMP_NUM_THREADS is set. The worker process, bound by its
    GIL, needs at most one core, and OpenMP threads that meet at the end of every operation all
    wait whenever one of them waits for its core. On the 2-core machine, with other work on it,
    a 64-row stories260K decode pass took 4.6 and 5.5 ms alone with one thread against 13.0 and
    14.3 ms with two (bench.decode_step, two runs of 9 rounds), and in a worker serving 64
    clients through an engine process 6.5-9.6 ms against 10.4-15.8 ms (4 alternated rounds,
    medians of 3), for 2,420-3,797 tokens/s against 2,116-3,232."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, _cores() - 1)


def pass_threads() -> dict[str, int] | None:
    """Torch threads per kind of forward pass (ModelHost.forward); None where OMP_NUM_THREADS
    is set. Prefill and scoring passes are large operations, long enough that every core pays:
    on the 2-core machine an 855-item MMLU run alone (bench.interactive's run, repeated in one
    stack) took 12.0-12.8 s with scoring passes on both cores against 14.5-15.4 s on one
    (OMP_NUM_THREADS=1; three runs each, the machine otherwise idle). A small pass gains little
    from them and costs CPU the rest of the host needs: a 256-token stories260K prefill took
    4.2 ms on two threads against 4.9 on one (8.4 against 4.9 ms of CPU), a 4,096-token one 25
    against 42 ms; passes under `small_pass_tokens` run on the decode pass's threads."""
    decode = default_torch_threads()
    if decode is None:
        return None
    return {"decode": decode, "prefill": _cores(), "score": _cores()}


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling; else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def run_engine_process(
    config: EngineConfig | None, conn: Connection, worker_pid: int, die_with_worker: bool
) -> None:
    """The engine process's main: load the model, start the engine, serve the worker's commands
    until it says stop or is gone. Without a config (a spare, workers/spare_engines.py), wait
    for it as the first message."""
    # Signals to the whole group are the worker's to handle; it stops this process last.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if die_with_worker and sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:  # the worker died before the line above
        os._exit(0)
    if config is None:
        try:
            config = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # a spare whose worker is gone, or that it never needed
    configure_logging(config.log_level, config.log_json)
    threads = pass_threads()
    if threads is not None:
        torch.set_num_threads(threads["decode"])  # before the engine thread's first operation
    reporter = _Reporter(conn)
    try:
        host = ModelHost.load(config.model, config.device, config.data_dir)
    except Exception as exc:
        log.exception("the engine process could not load its model")
        reporter.send_message(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    host.pass_threads = threads
    host.small_pass_tokens = get_settings().small_pass_tokens
    engine = GenerationEngine(
        host,
        **config.engine_options,
        on_tokens=reporter.tokens,
        observer=reporter,
        on_cycle=reporter.send,
    )
    settle(get_settings().gc_young_threshold)  # the model is loaded: see llmq/heap.py
    reporter.send_message(Ready(host.facts()))
    engine.start()
    log.info("engine process serving", pid=os.getpid(), torch_threads=threads)
    _serve(conn, engine, reporter)


def _serve(conn: Connection, engine: GenerationEngine, reporter: _Reporter) -> None:
    while True:
        try:
            commands = conn.recv()
        except (EOFError, OSError):
            _worker_gone()
        for command in commands:
            if isinstance(command, Submit):
                _submit(engine, reporter, command)
            elif isinstance(command, Cancel):
                engine.cancel(command.job_id)
            elif isinstance(command, Stop):
                engine.stop(command.timeout)
                reporter.send()  # the jobs the stop failed
                return


def _submit(engine: GenerationEngine, reporter: _Reporter, command: Submit) -> None:
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
