"""An engine process started ahead of need, for a worker of several models: a new engine process
spends most of a model switch starting Python and importing torch and Transformers
(bench.lifecycle measures a switch), so a worker that may load another model keeps one spare
process with those imports done, waiting for the model it will load. Its cost is that process's
memory while it waits (the libraries, no weights).

The spare learns its model as the first message on its pipe (workers/engine_main.py). It is
started from a background thread, so the kernel's parent-death signal cannot follow the worker;
the pipe's end of file ends it as it does any engine process whose worker is gone.
"""

import atexit
import multiprocessing
import os
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import structlog

from workers.engine_main import run_engine_process

log = structlog.get_logger(__name__)

_lock = threading.Lock()
_spare: tuple[BaseProcess, Connection] | None = None


def keep_a_spare() -> None:
    """Start a spare engine process in the background, unless one waits already."""
    with _lock:
        if _spare is not None and _spare[0].is_alive():
            return
    threading.Thread(target=_start, name="llmq-engine-spare", daemon=True).start()


def take_spare() -> tuple[BaseProcess, Connection] | None:
    """The waiting spare (its process and this side of its pipe), if one is alive; the caller
    sends it its EngineConfig. A new spare starts for the next load."""
    global _spare
    with _lock:
        spare, _spare = _spare, None
    if spare is not None and not spare[0].is_alive():
        spare = None
    keep_a_spare()
    return spare


def _start() -> None:
    global _spare
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=run_engine_process,
        args=(None, theirs, os.getpid(), False),
        name="llmq-engine-spare",
        daemon=False,
    )
    process.start()
    theirs.close()
    atexit.register(_kill, process)
    with _lock:
        if _spare is None:
            _spare = (process, ours)
            log.info("spare engine process started", pid=process.pid)
            return
    _kill(process)  # another spare got there first


def _kill(process: BaseProcess) -> None:
    if process.is_alive():
        process.kill()
        process.join(5)
