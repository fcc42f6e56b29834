"""Which workers and queues are alive, polled from Celery's own broadcast in the background."""

import time
from collections import Counter

from celery import Celery

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
        self.updated_at = 0.0
        # When each worker last answered, and since when polls have answered without a break:
        # a worker unseen for long while polls work is lost (killed, frozen, or unreachable).
        self.seen_at: dict[str, float] = {}
        self.answering_since: float | None = None
        self._poller = PeriodicTask("llmq-live-queues", interval_s, self.refresh, at_start=True)

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    def refresh(self) -> set[str]:
        try:
            replies = self.app.control.inspect(timeout=self.reply_timeout_s).active_queues()
        except Exception:
            self.answering_since = None
            raise
        replies = replies or {}
        now = time.monotonic()
        self.queues = {q["name"] for queues in replies.values() for q in queues}
        self.consumers = Counter(q["name"] for queues in replies.values() for q in queues)
        self.seen_at.update(dict.fromkeys(replies, now))
        if self.answering_since is None:
            self.answering_since = now
        self.updated_at = time.time()
        return self.queues

    def lost(self, workers: set[str], after_s: float, ping_timeout_s: float = 5.0) -> set[str]:
        """Those of `workers` that have not answered for `after_s` while polling worked, and
        do not answer a last ping either (a busy worker may miss a short poll or two)."""
        if self.answering_since is None:
            return set()  # the broker is away: nobody can be judged
        cutoff = time.monotonic() - after_s
        silent = {w for w in workers if self.seen_at.get(w, self.answering_since) < cutoff}
        if not silent:
            return silent
        replies = self.app.control.ping(destination=sorted(silent), timeout=ping_timeout_s)
        answered = {name for reply in replies or [] for name in reply}
        self.seen_at.update(dict.fromkeys(answered, time.monotonic()))
        return silent - answered

    def active_tasks(self, workers: set[str], timeout_s: float = 5.0) -> dict[str, set[str]] | None:
        """The task ids (job ids) each of `workers` is executing; None if any did not answer."""
        replies = self.app.control.inspect(destination=sorted(workers), timeout=timeout_s).active()
        if not replies or set(replies) != workers:
            return None
        return {worker: {task["id"] for task in tasks} for worker, tasks in replies.items()}
