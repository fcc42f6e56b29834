"""The Celery app of the workers. The model is loaded once per worker process, at start-up."""

import os
import sys

import structlog
from celery import Celery
from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from llmq.logs import configure_logging
from llmq.registry import get_registry
from llmq.settings import get_settings
from llmq.tracing import configure_tracing
from workers import broker_transport
from workers.draining import DrainingHeart

log = structlog.get_logger(__name__)

broker_transport.install()
app = Celery("llmq", include=["workers.tasks"])
app.config_from_object("celeryconfig")

_runtime = None
_draining: DrainingHeart | None = None


def get_runtime():  # -> workers.runtime.WorkerRuntime
    if _runtime is None:
        raise RuntimeError("this worker process has no model loaded")
    return _runtime


@worker_init.connect
def load_model(sender=None, **_kwargs) -> None:
    """Runs before the worker consumes: with the threads pool this is the one process."""
    global _runtime
    from workers.metrics import serve_metrics  # kept out of Flower, which imports this app

    settings = get_settings()
    # Here, in the one process of the threads pool, before any task: the Celery
    # instrumentation hooks the task signals of this process.
    configure_tracing("llmq-worker")
    configure_logging(settings.log_level, settings.log_json)
    worker_name = getattr(sender, "hostname", "worker")
    try:
        serve_metrics(settings)
        spec = get_registry().get(settings.worker_model)
        if spec is not None and spec.is_remote:
            from workers.remote.runtime import RemoteRuntime  # no torch: no weights here

            _runtime = RemoteRuntime.start(settings, spec, worker_name)
        else:
            from workers.runtime import WorkerRuntime  # torch is imported by model workers only

            _runtime = WorkerRuntime.start(settings, worker_name)
    except Exception:
        # Celery logs a failing signal handler and consumes all the same: every job taken would
        # then fail. Exit before the first message instead, so a supervisor restarts the worker
        # (compose, `make run`) and the jobs wait in the queue for one that loads.
        log.exception("the worker could not load its model; exiting")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


@worker_shutdown.connect
def release_model(**_kwargs) -> None:
    if _runtime is not None:
        _runtime.stop()


@worker_shutting_down.connect
def keep_beating(sender=None, **_kwargs) -> None:
    """A draining worker must not look dead to the API: see workers/draining.py."""
    global _draining
    try:
        _draining = _draining or DrainingHeart(app, str(sender))
        _draining.start()
    except Exception as exc:  # the broker may be away; shutting down must go on
        log.warning("could not send heartbeats while draining", error=str(exc))
