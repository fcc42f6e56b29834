"""The workers' remote-control channel as the API uses it: Celery broadcasts, answered by the
commands of workers/control.py (what each worker serves and has loaded; load, unload, reload)."""

from celery import Celery

REPORT_COMMAND = "llmq_models"


def worker_reports(
    app: Celery,
    timeout_s: float = 1.0,
    expected: int | None = None,
    workers: list[str] | None = None,
) -> dict[str, dict]:
    """Each live worker's report (of `workers` only, when given): its device, uptime and the
    models it serves with their state. Returns as soon as `expected` workers have answered,
    else after `timeout_s`."""
    replies = app.control.broadcast(
        REPORT_COMMAND,
        destination=workers,
        reply=True,
        timeout=timeout_s,
        limit=expected or None,
    )
    return {
        worker: body
        for reply in replies or []
        for worker, body in reply.items()
        if isinstance(body, dict) and "models" in body
    }


def send_command(
    app: Celery, worker: str, command: str, timeout_s: float = 2.0, **arguments: object
) -> dict | None:
    """One worker's answer to a command; None if it did not answer in time."""
    replies = app.control.broadcast(
        command,
        arguments=arguments,
        destination=[worker],
        reply=True,
        timeout=timeout_s,
        limit=1,
    )
    for reply in replies or []:
        if worker in reply:
            return reply[worker]
    return None
