"""Workers killed, stopped or frozen mid-batch: every accepted job still finishes exactly once.

Each test runs its own workers of `tiny-faults` and injects the fault with a real signal.
"""

import json
import os
import signal
import time

from redis import Redis

from llmq.events import events_key
from tests.faults import (
    LONG_JOB,
    assert_each_succeeded_once,
    running_on,
    statuses,
    submit_jobs,
    wait_until,
)


def test_sigkill_mid_batch_redelivers_every_job_once(client, fault_workers, database_url):
    doomed = fault_workers()
    job_ids = submit_jobs(client, 6)
    wait_until(lambda: running_on(database_url, job_ids, doomed.pid) >= 2, 60, "a running batch")
    doomed.kill()
    doomed.wait()
    survivor = fault_workers()

    jobs = assert_each_succeeded_once(database_url, job_ids)
    assert all(f".{survivor.pid}@" in job.worker for job in jobs)
    assert max(job.attempts for job in jobs) >= 2  # the killed batch ran again
    assert all(len(job.result.text) > 0 for job in jobs)


def test_sigterm_finishes_held_jobs_and_exits_cleanly(client, fault_workers, database_url):
    worker = fault_workers()
    job_ids = submit_jobs(client, 4)
    wait_until(lambda: running_on(database_url, job_ids, worker.pid) >= 1, 60, "a running batch")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=90) == 0

    # What it held is finished; anything it had not taken waits for the next worker.
    held = statuses(database_url, job_ids)
    assert "running" not in held.values(), held
    if "queued" in held.values():
        fault_workers()
    assert_each_succeeded_once(database_url, job_ids)


def test_frozen_worker_is_replaced_and_its_late_results_are_dropped(
    client, fault_workers, database_url
):
    frozen = fault_workers()
    job_ids = submit_jobs(client, 4)
    wait_until(lambda: running_on(database_url, job_ids, frozen.pid) >= 1, 60, "a running batch")
    os.kill(frozen.pid, signal.SIGSTOP)
    replacement = fault_workers()

    jobs = assert_each_succeeded_once(database_url, job_ids)
    assert all(f".{replacement.pid}@" in job.worker for job in jobs)
    os.kill(frozen.pid, signal.SIGCONT)  # it wakes up and finishes the batch it held...
    time.sleep(3)
    jobs = assert_each_succeeded_once(database_url, job_ids)  # ...and stores nothing
    assert all(f".{replacement.pid}@" in job.worker for job in jobs)


def test_cancelled_running_job_leaves_its_batch(client, fault_workers, database_url, redis_url):
    worker = fault_workers()
    doomed, *neighbours = submit_jobs(client, 6)  # a full batch decodes slowly enough
    wait_until(lambda: running_on(database_url, [doomed], worker.pid), 60, "the job to run")
    response = client.post(f"/v1/jobs/{doomed}/cancel")
    assert response.status_code == 200, response.text

    assert_each_succeeded_once(database_url, neighbours)
    cancelled = client.get(f"/v1/jobs/{doomed}").json()
    assert cancelled["status"] == "cancelled" and cancelled["result"] is None
    # The worker announced the early end itself, with the tokens made until then.
    redis = Redis.from_url(redis_url)
    final = wait_until(
        lambda: [
            e for _, e in redis.xrevrange(events_key(doomed), count=1) if b"status" in e[b"data"]
        ],
        10,
        "the cancelled job's final event",
    )
    done = json.loads(final[0][b"data"])
    assert done["status"] == "cancelled"
    assert 0 < done["completion_tokens"] < LONG_JOB["max_tokens"]
    assert worker.poll() is None
