"""The operator's commands to a worker, through Celery's own remote-control channel (broadcast
commands with replies), as `celery inspect` and Flower use it:

- `llmq_models` (inspect): the worker's device, uptime and each model it serves with its state
  (unloaded, loading, loaded, draining, unloading), messages running and memory;
- `llmq_load`, `llmq_unload` (with `force`: its running jobs go back to the queue at once),
  `llmq_reload` (drain, then load the entry models.yaml holds now: new weights, no restart).

Commands run in the worker's consumer thread, which must keep fetching messages and sending
heartbeats: a command answers at once and its work goes on in a thread of its own; its outcome
shows in `llmq_models`.
"""

import os
import socket
import threading
import time
from collections.abc import Callable

import structlog
from celery.worker.control import control_command, inspect_command

from llmq.registry import load_registry
from llmq.settings import get_settings
from workers.app import STARTED_AT, get_pool
from workers.model_pool import ModelUnavailable

log = structlog.get_logger(__name__)


@inspect_command()
def llmq_models(state) -> dict:
    """The models this worker serves and which of them are loaded."""
    settings = get_settings()
    pool = get_pool()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": settings.worker_device,
        "max_loaded_models": pool.max_loaded,
        "uptime_s": round(time.time() - STARTED_AT, 1),
        "models": pool.describe(),
    }


@control_command(args=[("model", str)], signature="<model>")
def llmq_load(state, model: str) -> dict:
    """Load a model this worker serves (the least recently used one makes room)."""
    return _in_background(model, "load", lambda pool: pool.load(model))


@control_command(args=[("model", str), ("force", bool)], signature="<model> [force]")
def llmq_unload(state, model: str, force: bool = False) -> dict:
    """Unload a model once its running jobs end; with force, hand them back to the queue."""
    return _in_background(model, "unload", lambda pool: pool.unload(model, force=force))


@control_command(args=[("model", str)], signature="<model>")
def llmq_reload(state, model: str) -> dict:
    """Load the model's entry as models.yaml has it now, once its running jobs end."""
    spec = load_registry(get_settings().models_file).get(model)
    if spec is None:
        return {"error": f"{model} is no longer in models.yaml"}
    return _in_background(model, "reload", lambda pool: pool.reload(model, spec))


def _in_background(model: str, action: str, work: Callable) -> dict:
    pool = get_pool()
    if model not in pool.specs:
        return {"error": f"this worker does not serve {model}; it serves {', '.join(pool.specs)}"}

    def run() -> None:
        try:
            work(pool)
            log.info(f"model {action} done", model=model)
        except (ModelUnavailable, TimeoutError) as exc:
            log.error(f"model {action} failed", model=model, error=str(exc))
        except Exception:
            log.exception(f"model {action} failed", model=model)

    threading.Thread(target=run, name=f"llmq-{action}-{model}", daemon=True).start()
    return {"ok": f"{action} of {model} started"}
