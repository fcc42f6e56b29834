"""A background thread that does one thing at a fixed interval: the shape of the API's worker
poller, reconciler and eval driver, and of a worker's cancellation watcher."""

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class PeriodicTask:
    """Calls `tick` every `interval_s` on a daemon thread until stopped. A tick that raises is
    logged and the next one tries again: Postgres or Redis may be away for a while."""

    def __init__(
        self, name: str, interval_s: float, tick: Callable[[], object], *, at_start: bool = False
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.tick = tick
        self.at_start = at_start  # tick once right away, rather than after the first interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        if self.at_start:
            self._tick_once()
        while not self._stop.wait(self.interval_s):
            self._tick_once()

    def _tick_once(self) -> None:
        try:
            self.tick()
        except Exception as exc:
            log.warning("periodic task failed; it runs again", task=self.name, error=str(exc))
