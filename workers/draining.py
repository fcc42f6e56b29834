"""Heartbeats while a worker drains its jobs in a warm shutdown.

Celery stops a worker's consumer first, its heartbeats and broadcast replies with it, and only
then waits for the tasks it holds: a worker finishing long jobs after SIGTERM would look dead to
the API's reconciler (api/fleet/heartbeats.py), which would hand its jobs to another worker and
throw the finished work away. From the moment shutdown begins, Celery's own heartbeat service
runs again on a timer thread of its own, until the process exits.
"""

import structlog
from celery import Celery
from celery.utils.timer2 import Timer
from celery.worker.heartbeat import Heart

log = structlog.get_logger(__name__)

HEARTBEAT_S = 2.0  # Celery's own worker heartbeat interval


class DrainingHeart:
    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._timer: Timer | None = None

    def start(self) -> None:
        if self._timer is not None:
            return  # a second signal (a cold shutdown): already beating
        connection = self.app.connection_for_write()
        dispatcher = self.app.events.Dispatcher(connection, hostname=self.hostname, enabled=True)
        self._timer = Timer()
        Heart(self._timer, dispatcher, interval=HEARTBEAT_S).start()
        log.info("draining; heartbeats go on until the held jobs are done")
