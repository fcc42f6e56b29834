"""Which workers and queues are alive: the consumed queues and each worker's loaded models polled
from Celery's broadcasts in the background, and each worker's liveness from its heartbeats
(api/fleet/heartbeats.py)."""

import time
from collections import Counter

from celery import Celery

from api.fleet.control import worker_reports
from api.fleet.heartbeats import WorkerHeartbeats
from llmq.periodic import PeriodicTask


class LiveQueues:
    """Keeps the set of consumed queues fresh without putting a broadcast on any request path."""

    def __init__(self, app: Celery, interval_s: float, reply_timeout_s: float = 1.0) -> None:
        self.app = app
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.queues: set[str] = set()
        # How many workers consume each queue, for the live-workers gauge.
        self.consumers: Counter[str] = Counter()
        self.worker_queues: dict[str, set[str]] = {}
        # The models each worker has loaded now (a worker may serve more than it holds).
        self.loaded: dict[str, set[str]] = {}
        self.updated_at = 0.0
        self.heartbeats = WorkerHeartbeats(app)
        self._poller = PeriodicTask("llmq-live-queues", interval_s, self.refresh, at_start=True)

    def start(self) -> None:
        self.heartbeats.start()
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()
        self.heartbeats.stop()

    def refresh(self) -> set[str]:
        replies = self.app.control.inspect(timeout=self.reply_timeout_s).active_queues() or {}
        self.queues = {q["name"] for queues in replies.values() for q in queues}
        self.consumers = Counter(q["name"] for queues in replies.values() for q in queues)
        self.worker_queues = {w: {q["name"] for q in queues} for w, queues in replies.items()}
        self.heartbeats.heard(set(replies))
        reports = worker_reports(self.app, self.reply_timeout_s, len(replies)) if replies else {}
        self.loaded = {
            worker: {m["model"] for m in report["models"] if m["state"] == "loaded"}
            for worker, report in reports.items()
        }
        self.updated_at = time.time()
        return self.queues

    def lost(self, workers: set[str], after_s: float, ping_timeout_s: float = 1.0) -> set[str]:
        """Those of `workers` without a heartbeat for `after_s` that do not answer a last ping
        either: a worker that is only slow (a long prefill, a loaded machine) still answers."""
        silent = self.heartbeats.silent(workers, after_s)
        if not silent:
            return silent
        replies = self.app.control.ping(destination=sorted(silent), timeout=ping_timeout_s)
        answered = {name for reply in replies or [] for name in reply}
        self.heartbeats.heard(answered)
        return silent - answered

    def active_tasks(self, workers: set[str], timeout_s: float = 5.0) -> dict[str, set[str]] | None:
        """The task ids (job ids) each of `workers` is executing; None if any did not answer."""
        replies = self.app.control.inspect(destination=sorted(workers), timeout=timeout_s).active()
        if not replies or set(replies) != workers:
            return None
        return {
            worker: {job for task in tasks for job in task_job_ids(task)}
            for worker, tasks in replies.items()
        }


def task_job_ids(task: dict) -> list[str]:
    """The jobs of an active task: its id, or a group message's job ids."""
    args = task.get("args") or [{}]
    job_ids = args[0].get("job_ids") if isinstance(args[0], dict) else None
    return [str(job_id) for job_id in job_ids] if job_ids else [task["id"]]
