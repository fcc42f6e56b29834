"""The Celery app of the workers. The models a worker serves are set at start-up; which of them
are loaded changes as jobs come (workers/model_pool.py) and as the operator asks
(workers/control.py)."""

import os
import sys
import time

import structlog
from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from llmq.heap import settle
from llmq.logs import configure_logging
from llmq.registry import ModelSpec, get_registry
from llmq.settings import Settings, get_settings
from llmq.tracing import WORKER_LIBRARIES, configure_tracing
from workers import broker_transport
from workers.draining import DrainingHeart
from workers.model_pool import ModelPool, ModelUnavailable

log = structlog.get_logger(__name__)

broker_transport.install()
app = Celery("llmq", include=["workers.tasks", "workers.control"])
app.config_from_object("celeryconfig")

_pool: ModelPool | None = None
_draining: DrainingHeart | None = None
STARTED_AT = time.time()


def get_pool() -> ModelPool:
    if _pool is None:
        raise RuntimeError("this worker process serves no models")
    return _pool


@worker_init.connect
def load_models(sender=None, **_kwargs) -> None:
    """Runs before the worker consumes: with the threads pool this is the one process."""
    global _pool
    from workers.metrics import serve_metrics  # kept out of Flower, which imports this app

    settings = get_settings()
    # Here, in the one process of the threads pool, before any task: the Celery
    # instrumentation hooks the task signals of this process.
    configure_tracing("llmq-worker", WORKER_LIBRARIES)
    configure_logging(settings.log_level, settings.log_json)
    worker_name = getattr(sender, "hostname", "worker")
    try:
        serve_metrics(settings)
        specs = served_specs(settings)
        max_loaded = min(settings.worker_max_loaded_models or len(specs), len(specs))
        _pool = ModelPool(
            specs,
            max_loaded=max_loaded,
            start_runtime=_runtime_starter(settings, specs, worker_name, max_loaded < len(specs)),
            wait_s=settings.worker_model_wait_s,
        )
        # The first models are loaded before the worker consumes, so the first jobs do not wait.
        for model in list(specs)[: _pool.max_loaded]:
            try:
                _pool.load(model)
            except ModelUnavailable:
                if len(specs) == 1:
                    raise
                log.error("model not loaded at start; its jobs will try again", model=model)
    except Exception:
        # Celery logs a failing signal handler and consumes all the same: every job taken would
        # then fail. Exit before the first message instead, so a supervisor restarts the worker
        # (compose, `make run`) and the jobs wait in the queue for one that loads.
        log.exception("the worker could not load its model; exiting")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


def served_specs(settings: Settings) -> dict[str, ModelSpec]:
    """The models this worker serves (LLMQ_WORKER_MODELS, else LLMQ_WORKER_MODEL), checked."""
    registry = get_registry()
    specs: dict[str, ModelSpec] = {}
    for model in settings.worker_models or [settings.worker_model]:
        spec = registry.get(model)
        if spec is None:
            raise RuntimeError(f"model {model!r} is not in {settings.models_file}")
        specs[spec.id] = spec
    if len(specs) > 1 and any(spec.is_remote for spec in specs.values()):
        raise RuntimeError("a remote model's worker serves that model alone")
    return specs


def _runtime_starter(
    settings: Settings, specs: dict[str, ModelSpec], worker_name: str, switches: bool
):
    """How this worker starts a model's runtime: a remote model's (no torch) or a local one's;
    a worker that switches models keeps a spare engine process for its next load."""
    if any(spec.is_remote for spec in specs.values()):
        from workers.remote.runtime import RemoteRuntime  # no torch: no weights here

        return lambda spec: RemoteRuntime.start(settings, spec, worker_name)
    from workers.host import detect_device  # torch is imported by model workers only
    from workers.runtime import WorkerRuntime

    device = detect_device(settings.worker_device)
    spare = switches and settings.engine_process
    if spare:
        from workers.spare_engines import keep_a_spare

        keep_a_spare()
    return lambda spec: WorkerRuntime.start(settings, spec, device, worker_name, spare)


@worker_ready.connect
def settle_heap(**_kwargs) -> None:
    """Models loaded and the consumer started: see llmq/heap.py."""
    settle(get_settings().gc_young_threshold)


@worker_shutdown.connect
def release_models(**_kwargs) -> None:
    if _pool is not None:
        _pool.stop()


@worker_shutting_down.connect
def keep_beating(sender=None, **_kwargs) -> None:
    """A draining worker must not look dead to the API: see workers/draining.py."""
    global _draining
    try:
        _draining = _draining or DrainingHeart(app, str(sender))
        _draining.start()
    except Exception as exc:  # the broker may be away; shutting down must go on
        log.warning("could not send heartbeats while draining", error=str(exc))
