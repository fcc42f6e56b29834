"""A background thread that does one thing at a fixed interval: the shape of the API's worker
poller, reconciler and eval driver, and of a worker's cancellation watcher."""

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class PeriodicTask:
    """Calls `tick` every `interval_s` on a daemon thread until stopped. A tick that raises is
    logged and tried again after `retry_s` (at most `interval_s`): Postgres or Redis may be away
    for a while, and what the task does is most needed the moment they are back. With
    `idle_interval_s`, a tick that returns False (it found nothing to do) is followed by the
    next one after that longer interval. `wake()` runs the next tick at once."""

    def __init__(
        self,
        name: str,
        interval_s: float,
        tick: Callable[[], object],
        *,
        at_start: bool = False,
        retry_s: float | None = None,
        idle_interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.retry_s = min(retry_s, interval_s) if retry_s is not None else interval_s
        self.idle_interval_s = idle_interval_s
        self.tick = tick
        self.idle = False
        self.at_start = at_start  # tick once right away, rather than after the first interval
        self.failing = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        if self.at_start:
            self._tick_once()
        while not self._stop.is_set():
            self._wake.wait(self._next_wait())
            self._wake.clear()
            if not self._stop.is_set():
                self._tick_once()

    def _next_wait(self) -> float:
        if self.failing:
            return self.retry_s
        if self.idle and self.idle_interval_s is not None:
            return max(self.idle_interval_s, self.interval_s)
        return self.interval_s

    def _tick_once(self) -> None:
        try:
            self.idle = self.tick() is False
        except Exception as exc:
            # The first failure is a warning; repeats while it stays down are not news.
            (log.debug if self.failing else log.warning)(
                "periodic task failed; it runs again", task=self.name, error=str(exc)
            )
            self.failing = True
            return
        if self.failing:
            log.info("periodic task works again", task=self.name)
            self.failing = False
