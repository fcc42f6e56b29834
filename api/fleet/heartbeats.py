"""Which workers are alive, from Celery's own worker heartbeats.

Every worker sends a `worker-heartbeat` event every 2 s from its consumer's event loop, and
keeps sending them while it drains its jobs in a warm shutdown (workers/draining.py). A thread
in each API process listens to the worker events alone (routing key `worker.#`: no task events),
so a worker that was killed, frozen or cut off is noticed seconds after its last heartbeat, not
after a broadcast poll has gone unanswered for half a minute. A `worker-offline` event proves
nothing by itself: Celery sends it when a warm shutdown begins, before the held jobs finish.
"""

import threading
import time

import structlog
from celery import Celery

log = structlog.get_logger(__name__)

# What shows a worker alive. `worker-offline` is not listened to: it proves nothing either way.
WORKER_EVENTS = ("worker-heartbeat", "worker-online")


class WorkerHeartbeats:
    """When each worker last sent a heartbeat, and since when that is known without a break."""

    def __init__(self, app: Celery, reconnect_s: float = 1.0) -> None:
        self.app = app
        self.reconnect_s = reconnect_s
        self.last_beat: dict[str, float] = {}
        # None while not listening (the broker is away): then silence proves nothing.
        self.listening_since: float | None = None
        self._receiver = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="llmq-heartbeats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def silent(self, workers: set[str], after_s: float) -> set[str]:
        """Those of `workers` with no heartbeat for `after_s` while this process listened."""
        if self.listening_since is None:
            return set()
        now = time.monotonic()
        cutoff = now - after_s
        # A worker never heard from counts from when listening began, so that an API process
        # that has just started judges nobody before it could have heard them.
        return {w for w in workers if self.last_beat.get(w, self.listening_since) < cutoff}

    def heard(self, workers: set[str]) -> None:
        """`workers` answered in another way (a ping): alive as of now."""
        now = time.monotonic()
        self.last_beat.update(dict.fromkeys(workers, now))

    def _on_event(self, event: dict) -> None:
        if hostname := event.get("hostname"):
            self.last_beat[hostname] = time.monotonic()

    def _listen(self) -> None:
        handlers = dict.fromkeys(WORKER_EVENTS, self._on_event)
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    self._receiver = self.app.events.Receiver(
                        connection, handlers=handlers, routing_key="worker.#"
                    )
                    if self._stop.is_set():
                        return
                    self.listening_since = time.monotonic()
                    self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:
                if self.listening_since is not None:
                    log.warning("lost the workers' heartbeats; listening again", error=str(exc))
            self.listening_since = None
            self._stop.wait(self.reconnect_s)
