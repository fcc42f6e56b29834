"""Makes Postgres's view of the jobs come true on the broker: the guarantee that every accepted
job finishes, whatever the broker or a worker lost.

Each sweep, in one API process at a time (a Postgres advisory lock):
- the running jobs of workers that sent no heartbeat for `worker_lost_after_s` and do not answer
  a last ping (killed, frozen, on a lost machine) go back to queued. kombu would hand their
  unacknowledged messages back only after the visibility timeout (an hour), and some `kill -9`
  cases never; a job that already lost `max_job_attempts` workers fails instead.
- running jobs that a live worker is not executing (Celery's own list of its active tasks),
  two checks in a row, go back to queued: their task ended without storing an outcome.
- queued jobs last sent more than `requeue_after_s` ago whose message is not waiting in their
  queue are sent again: the enqueue after the commit failed, or a message was lost.
- when the broker may have lost messages (Redis answers again after an outage, a send failed,
  or Redis came back empty: a restart without persistence or a flush, seen as a missing marker
  key), every queued job whose message is not waiting is sent again at once, not
  `requeue_after_s` later.
A job sent twice still runs once: claiming it is a compare-and-set on its row.
"""

import json
import time
import uuid
from dataclasses import dataclass

import structlog
from redis import Redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.fleet.live_workers import LiveQueues
from api.fleet.queues import message_job_ids, priority_lists
from api.intake.enqueue import send_failed, send_jobs
from db.queries import jobs as job_queries
from db.session import session_scope
from llmq.metrics import job_failed
from llmq.periodic import PeriodicTask
from llmq.protocol import ErrorCategory
from llmq.settings import Settings

log = structlog.get_logger(__name__)

# Any constant shared by all API processes; it names the reconciler's advisory lock.
ADVISORY_LOCK_KEY = 0x6C6C6D71  # "llmq"
MAX_JOBS_PER_SWEEP = 5000
# A key the reconciler keeps in Redis: when it is gone, Redis lost its data and with it the
# queued messages.
BROKER_MARKER_KEY = "llmq:broker-marker"
# Asking every live worker for its active tasks costs each of them a reply: not every sweep.
ORPHAN_CHECK_S = 10.0
# A job committed this recently may still be on its way to the broker: not sent again yet.
SEND_GRACE_S = 1.0
# How soon a sweep that failed (Postgres or Redis away) is tried again.
RETRY_S = 1.0


@dataclass(frozen=True)
class SweepReport:
    ran: bool  # False when another process held the lock
    requeued_from_lost_workers: int = 0
    failed_after_lost_workers: int = 0
    resent: int = 0


def waiting_job_ids(redis: Redis, queues: set[str]) -> set[str]:
    """Ids of the jobs whose messages wait in these queues."""
    ids: set[str] = set()
    for key in (key for queue in queues for key in priority_lists(queue)):
        for raw in redis.lrange(key, 0, -1):
            try:
                headers = json.loads(raw)["headers"]
                ids.update(message_job_ids(headers))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # not a Celery message; the worker will reject it
    return ids


class Reconciler:
    def __init__(self, settings: Settings, live: LiveQueues) -> None:
        self.settings = settings
        self.live = live
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=10)
        self._orphan_suspects: set[str] = set()
        self._orphans_checked_at = 0.0
        self._broker_marker: bytes | None = None
        # Until a sweep has checked every queued job, the broker may be missing some.
        self._resend_all = True
        self._sweeper = PeriodicTask(
            "llmq-reconciler", settings.reconcile_interval_s, self._sweep_or_flag, retry_s=RETRY_S
        )

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()
        self.redis.close()

    def _sweep_or_flag(self) -> SweepReport:
        try:
            return self.sweep()
        except Exception:
            # Redis or Postgres was away: what the broker holds is unknown until checked in full.
            self._resend_all = True
            raise

    def sweep(self) -> SweepReport:
        if self._broker_lost_messages() or send_failed.is_set():
            self._resend_all = True
        send_failed.clear()
        with session_scope(self.settings.database_url) as session:
            locked = session.scalar(
                text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
            if not locked:
                return SweepReport(ran=False)
            # A row held by a stalled transaction must not stall the sweep with it.
            session.execute(text("SET LOCAL lock_timeout = '5s'"))
            # Which worker runs what, read once: both checks below judge the same view.
            held = job_queries.running_jobs_by_worker(session)
            lost = self.live.lost(set(held), self.settings.worker_lost_after_s)
            requeued, failed_models = self._release_jobs_of(session, lost)
            live = {worker: jobs for worker, jobs in held.items() if worker not in lost}
            if time.monotonic() - self._orphans_checked_at >= ORPHAN_CHECK_S:
                requeued += self._release_orphans(session, live)
                self._orphans_checked_at = time.monotonic()
            if lost:
                # A lost worker also held messages of jobs it had not started yet: they wait
                # in kombu's unacked set, not in the queue, and are sent again now too.
                self._resend_all = True
            resend_all = self._resend_all
            older_than_s = SEND_GRACE_S if resend_all else self.settings.requeue_after_s
            stale = job_queries.stale_queued(session, older_than_s, MAX_JOBS_PER_SWEEP)
        # Sent after the commit: a worker given a released job's message before it would still
        # see the job running and drop the message. The transaction stays short, too.
        resent = self._resend_missing(stale)
        if len(stale) < MAX_JOBS_PER_SWEEP:  # every candidate was checked
            self._resend_all = False
        for model in failed_models:
            job_failed(model, ErrorCategory.WORKER_LOST.value)
        return SweepReport(True, requeued, len(failed_models), resent)

    def _release_jobs_of(self, session: Session, lost: set[str]) -> tuple[int, list[str]]:
        requeued, failed_models = job_queries.release_jobs_of(
            session, lost, self.settings.max_job_attempts
        )
        if lost:
            log.warning(
                "workers lost; their jobs go back to the queue",
                workers=sorted(lost),
                requeued=requeued,
                failed=len(failed_models),
            )
        return requeued, failed_models

    def _release_orphans(self, session: Session, live: dict[str, set[str]]) -> int:
        """Release the jobs `live` workers hold in Postgres but do not execute."""
        if not live:
            self._orphan_suspects = set()
            return 0
        active = self.live.active_tasks(set(live))
        if active is None:
            return 0  # a worker did not answer: judge nothing this time
        orphans = {job for worker, jobs in live.items() for job in jobs - active.get(worker, set())}
        # A task may start between the two reads: only a job orphaned twice in a row is.
        confirmed, self._orphan_suspects = orphans & self._orphan_suspects, orphans
        released = job_queries.release_jobs(session, confirmed)
        if released:
            log.warning("running jobs no worker executes go back to the queue", count=released)
        return released

    def _broker_lost_messages(self) -> bool:
        """Whether Redis lost its data since the last sweep: the marker key is gone or new."""
        self.redis.set(BROKER_MARKER_KEY, uuid.uuid4().hex, nx=True)
        marker = self.redis.get(BROKER_MARKER_KEY)
        changed = self._broker_marker is not None and marker != self._broker_marker
        self._broker_marker = marker
        if changed:
            log.warning("the broker lost its data; every queued job is checked now")
        return changed

    def _resend_missing(self, stale: list[job_queries.Delivery]) -> int:
        """Send again those of `stale` (queued jobs sent a while ago) whose message is not
        waiting in their queue; returns how many were sent."""
        if not stale:
            return 0
        waiting = waiting_job_ids(self.redis, {job.queue for job in stale})
        missing = [job for job in stale if str(job.id) not in waiting]
        resent = send_jobs(missing)
        # Jobs found waiting are fine: their clock restarts, so they are not scanned each sweep.
        with session_scope(self.settings.database_url) as session:
            job_queries.mark_enqueued(
                session, [j.id for j in stale if str(j.id) in waiting] + resent
            )
        if resent:
            log.warning("jobs missing from the broker were sent again", count=len(resent))
        return len(resent)
