"""Which queues have a live worker, polled from Celery's own broadcast in the background."""

import threading
import time

import structlog
from celery import Celery

log = structlog.get_logger(__name__)


class LiveQueues:
    """Keeps the set of consumed queues fresh without putting a broadcast on any request path."""

    def __init__(self, app: Celery, interval_s: float, reply_timeout_s: float = 1.0) -> None:
        self.app = app
        self.interval_s = interval_s
        self.reply_timeout_s = reply_timeout_s
        self.queues: set[str] = set()
        self.updated_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmq-live-queues", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> set[str]:
        replies = self.app.control.inspect(timeout=self.reply_timeout_s).active_queues() or {}
        self.queues = {q["name"] for queues in replies.values() for q in queues}
        self.updated_at = time.time()
        return self.queues

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # broker away: keep the last view, try again
                log.warning("worker poll failed", error=str(exc))
            self._stop.wait(self.interval_s)
