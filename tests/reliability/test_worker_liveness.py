"""Telling a dead worker from a slow one: the jobs of a killed worker run elsewhere within
seconds of its death (its heartbeats stop), while a worker that is only slow, paused for a
moment or draining its jobs after SIGTERM keeps every job it holds.

The suite's API runs the production thresholds: a worker counts as lost after 5 s without a
heartbeat (Celery's workers send one every 2 s) and a last ping left unanswered for 1 s."""

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import select

from db.session import session_scope
from db.tables import Job
from tests.faults import (
    assert_each_succeeded_once,
    running_on,
    submit_jobs,
    wait_until,
)

# Heartbeat silence (5 s), a last ping (1 s) and the sweep's interval (2 s): 8 s, with room for
# a loaded machine. Silence alone took 30 s before heartbeats were listened to.
RELEASED_WITHIN_S = 15.0


HOG = "import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass"


def held_by(database_url, job_ids, worker_pid: int, status: str = "running") -> set[str]:
    with session_scope(database_url) as session:
        rows = session.scalars(
            select(Job.id).where(
                Job.id.in_(job_ids), Job.status == status, Job.worker.like(f"%.{worker_pid}@%")
            )
        )
        return {str(job_id) for job_id in rows}


def attempts(database_url, job_ids) -> dict[str, int]:
    with session_scope(database_url) as session:
        rows = session.execute(select(Job.id, Job.attempts).where(Job.id.in_(job_ids)))
        return {str(row.id): row.attempts for row in rows}


def test_killed_workers_jobs_are_released_within_seconds(client, fault_workers, database_url):
    survivor = fault_workers()
    doomed = fault_workers()
    os.kill(survivor.pid, signal.SIGSTOP)  # so that the doomed worker takes the jobs
    try:
        job_ids = submit_jobs(client, 6)
        wait_until(lambda: running_on(database_url, job_ids, doomed.pid) >= 2, 60, "a batch")
    finally:
        os.kill(survivor.pid, signal.SIGCONT)
    doomed.kill()
    killed = time.monotonic()
    wait_until(lambda: running_on(database_url, job_ids, doomed.pid) == 0, 60, "the jobs' release")
    released_s = time.monotonic() - killed
    assert released_s < RELEASED_WITHIN_S, f"released {released_s:.1f} s after the kill"
    jobs = assert_each_succeeded_once(database_url, job_ids)
    assert all(f".{survivor.pid}@" in job.worker for job in jobs)


def test_paused_and_loaded_worker_keeps_its_jobs(client, fault_workers, database_url):
    worker = fault_workers()
    job_ids = submit_jobs(client, 8)
    wait_until(lambda: running_on(database_url, job_ids, worker.pid) >= 4, 60, "a batch")
    # A stall shorter than the heartbeat limit (a GC pause, a page-in), then a machine whose
    # cores are all taken by other work while the worker decodes.
    os.kill(worker.pid, signal.SIGSTOP)
    time.sleep(3)
    os.kill(worker.pid, signal.SIGCONT)
    hogs = [
        subprocess.Popen([sys.executable, "-c", HOG.format(seconds=12)])
        for _ in range(2 * (os.cpu_count() or 2))
    ]
    try:
        jobs = assert_each_succeeded_once(database_url, job_ids)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert all(f".{worker.pid}@" in job.worker for job in jobs)
    assert set(attempts(database_url, job_ids).values()) == {1}, "a job was taken away"


def test_draining_worker_keeps_its_jobs_until_it_exits(client, fault_workers, database_url):
    worker = fault_workers()
    job_ids = submit_jobs(client, 8)
    wait_until(lambda: running_on(database_url, job_ids, worker.pid) >= 4, 60, "a batch")
    # Other work on every core makes the drain outlast the heartbeat limit several times over.
    hogs = [
        subprocess.Popen([sys.executable, "-c", HOG.format(seconds=30)])
        for _ in range(4 * (os.cpu_count() or 2))
    ]
    try:
        held = held_by(database_url, job_ids, worker.pid)
        assert held, "the worker held no running job when it was stopped"
        worker.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert worker.wait(timeout=120) == 0
        drained_s = time.monotonic() - began
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    # It may also start jobs whose messages its threads already held: those are its own too.
    assert held <= held_by(database_url, job_ids, worker.pid, status="succeeded"), (
        f"a job was taken away during a {drained_s:.1f} s drain"
    )
    assert set(attempts(database_url, held).values()) == {1}
