"""Tells the engine about jobs cancelled in Postgres, so they leave their batch at the next step."""

import uuid
from typing import Protocol

from db.queries.jobs import cancelled_among
from db.session import session_scope
from llmq.periodic import PeriodicTask


class RunsJobs(Protocol):
    """What the watcher needs of an engine: the model's (workers/engine.py, in this process or
    its own) or a remote model's (workers/remote/engine.py)."""

    def active_job_ids(self) -> list[uuid.UUID]: ...

    def cancel(self, job_id: uuid.UUID) -> None: ...


class CancellationWatcher:
    def __init__(self, engine: RunsJobs, database_url: str, interval_s: float = 0.5):
        self.engine = engine
        self.database_url = database_url
        self._watch = PeriodicTask("llmq-cancel-watch", interval_s, self.check)

    def start(self) -> None:
        self._watch.start()

    def stop(self) -> None:
        self._watch.stop(5)

    def check(self) -> None:
        active = self.engine.active_job_ids()
        if not active:
            return
        with session_scope(self.database_url) as session:
            cancelled = cancelled_among(session, active)
        for job_id in cancelled:
            self.engine.cancel(job_id)
