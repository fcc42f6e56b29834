"""Admin endpoints of the model lifecycle: the live workers with the models each serves and has
loaded, and a model's load, unload (forced: its running jobs go back to the queue) and reload
with new weights. Commands travel on Celery's remote-control channel (workers/control.py)."""

import time
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Response, status

from api.deps import LiveQueuesDep, RegistryDep, SettingsDep
from api.fleet.control import send_command, worker_reports
from api.http.auth import require_admin
from api.schemas.workers import (
    ModelCommandPublic,
    ModelReloadPublic,
    WorkerPublic,
    WorkersPublic,
)
from llmq.errors import ModelNotServed, WorkerNotFound, WorkerRefused
from llmq.fingerprint import model_revisions
from llmq.registry import Registry

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])

Wait = Annotated[
    float,
    Query(ge=0, le=600, description="Seconds to wait for the command to finish (0: do not wait)"),
]
Action = Literal["load", "unload", "reload"]
POLL_S = 0.25
# A worker loading a model on a busy host may take more than a second to answer; each poll
# returns as soon as every worker asked has answered.
REPORT_TIMEOUT_S = 2.0


@router.get("/workers", response_model=WorkersPublic)
async def list_workers(live: LiveQueuesDep) -> WorkersPublic:
    """Each live worker: host, device, uptime, the models it serves with their state, the ones
    loaded now, the memory their weights take and the jobs running on them."""
    reports = await _reports(live)
    return WorkersPublic(
        data=[
            WorkerPublic.of(name, report, live.worker_queues.get(name, set()))
            for name, report in sorted(reports.items())
        ]
    )


@router.post("/workers/{worker}/models/{model}/load", response_model=ModelCommandPublic)
async def load_model(
    worker: str,
    model: str,
    live: LiveQueuesDep,
    registry: RegistryDep,
    response: Response,
    wait: Wait = 60,
) -> ModelCommandPublic:
    """Load a model on a worker that serves it, evicting its least recently used one if it
    holds as many as it may (a busy one once its running jobs end)."""
    return await _command(live, registry, response, worker, model, "load", wait)


@router.post("/workers/{worker}/models/{model}/unload", response_model=ModelCommandPublic)
async def unload_model(
    worker: str,
    model: str,
    live: LiveQueuesDep,
    registry: RegistryDep,
    response: Response,
    force: Annotated[
        bool,
        Query(description="Do not wait for its running jobs: hand them back to the queue"),
    ] = False,
    wait: Wait = 60,
) -> ModelCommandPublic:
    """Unload a model from a worker once its running jobs have ended (never cut: with `force`
    they go back to the queue and run again, there or on another worker). Its next job loads
    it again."""
    return await _command(live, registry, response, worker, model, "unload", wait, force=force)


@router.post("/models/{model}/reload", response_model=ModelReloadPublic)
async def reload_model(
    model: str,
    live: LiveQueuesDep,
    registry: RegistryDep,
    settings: SettingsDep,
    response: Response,
    wait: Wait = 120,
) -> ModelReloadPublic:
    """New weights without downtime: every worker serving the model drains its running jobs,
    loads the model's entry as models.yaml has it now (a new `revision`, or its folder's new
    files), and goes on; queued jobs wait meanwhile. A worker that has it unloaded takes the new
    entry at its next load. The completion cache never answers with the old weights' text."""
    _known(registry, model)
    reports = await _reports(live)
    serving = sorted(name for name, r in reports.items() if _model_of(r, model) is not None)
    before = {name: _model_of(reports[name], model) for name in serving}
    for name in serving:
        answer = await anyio.to_thread.run_sync(
            lambda name=name: send_command(live.app, name, "llmq_reload", model=model)
        )
        _check_answer(name, answer, live)
    outcomes = await _wait_for(live, serving, model, "reload", wait, before)
    # This API keys the completion cache by the new weights at once; other API processes within
    # llmq/fingerprint.py's REVISION_REFRESH_S. Workers keep no entry of weights they do not hold.
    model_revisions(settings.data_dir).forget(model)
    if not all(outcome.done for outcome in outcomes):
        response.status_code = status.HTTP_202_ACCEPTED
    return ModelReloadPublic(model=model, workers=outcomes)


async def _command(
    live,
    registry: Registry,
    response: Response,
    worker: str,
    model: str,
    action: Action,
    wait: float,
    **arguments: object,
) -> ModelCommandPublic:
    _known(registry, model)
    before = _model_of((await _reports(live, [worker])).get(worker, {}), model)
    answer = await anyio.to_thread.run_sync(
        lambda: send_command(live.app, worker, f"llmq_{action}", model=model, **arguments)
    )
    _check_answer(worker, answer, live)
    [outcome] = await _wait_for(live, [worker], model, action, wait, {worker: before})
    if not outcome.done:
        response.status_code = status.HTTP_202_ACCEPTED
    return outcome


async def _wait_for(
    live, workers: list[str], model: str, action: Action, wait: float, before: dict
) -> list[ModelCommandPublic]:
    """Poll the workers' reports until the command has ended on each, or `wait` runs out."""
    deadline = time.monotonic() + wait
    while True:
        reports = await _reports(live, workers)
        outcomes = [
            _outcome(name, model, action, _model_of(reports.get(name, {}), model), before.get(name))
            for name in workers
        ]
        if all(o.done for o in outcomes) or time.monotonic() >= deadline:
            return outcomes
        await anyio.sleep(POLL_S)


def _outcome(
    worker: str, model: str, action: Action, now: dict | None, before: dict | None
) -> ModelCommandPublic:
    if now is None:
        return ModelCommandPublic(
            worker=worker, model=model, action=action, done=False, state=None,
            error="the worker did not answer",
        )  # fmt: skip
    # Counted, not read from the state alone: a model's jobs may load it again right after an
    # unload, and an error shown may be an earlier load's.
    state = now["state"]
    counts = before or {"state": "unloaded", "loads": 0, "unloads": 0, "failures": 0}
    failed = now["failures"] > counts["failures"]
    if action == "unload":
        done = counts["state"] == "unloaded" or now["unloads"] > counts["unloads"]
    elif action == "load":
        done = state == "loaded" or failed
    else:  # reload: loaded anew, or (unloaded) the new entry kept for its next load
        reloaded = now["loads"] > counts["loads"] and state == "loaded"
        done = reloaded or counts["state"] == "unloaded" or failed
    error = now["error"] if failed else None  # this command's failure, not an earlier one's
    return ModelCommandPublic(
        worker=worker, model=model, action=action, done=done, state=state, error=error
    )


async def _reports(live, workers: list[str] | None = None) -> dict[str, dict]:
    expected = len(workers) if workers else len(live.worker_queues) or None
    return await anyio.to_thread.run_sync(
        lambda: worker_reports(live.app, REPORT_TIMEOUT_S, expected, workers)
    )


def _model_of(report: dict, model: str) -> dict | None:
    return next((m for m in report.get("models", []) if m["model"] == model), None)


def _known(registry: Registry, model: str) -> None:
    if registry.get(model) is None:
        raise ModelNotServed(model, registry.ids)


def _check_answer(worker: str, answer: dict | None, live) -> None:
    if answer is None:
        raise WorkerNotFound(worker, sorted(live.worker_queues))
    if "error" in answer:
        raise WorkerRefused(f"{worker}: {answer['error']}")
