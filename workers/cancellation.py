"""Tells the engine about jobs cancelled in Postgres, so they leave their batch at the next step."""

import threading

import structlog

from db.queries.jobs import cancelled_among
from db.session import session_scope
from workers.engine import GenerationEngine

log = structlog.get_logger(__name__)


class CancellationWatcher:
    def __init__(self, engine: GenerationEngine, database_url: str, interval_s: float = 0.5):
        self.engine = engine
        self.database_url = database_url
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmq-cancel-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            active = self.engine.active_job_ids()
            if not active:
                continue
            try:
                with session_scope(self.database_url) as session:
                    cancelled = cancelled_among(session, active)
            except Exception as exc:  # Postgres away: try again next round
                log.warning("cancellation check failed", error=str(exc))
                continue
            for job_id in cancelled:
                self.engine.cancel(job_id)
