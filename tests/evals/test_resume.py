"""Runs survive what kills processes: a worker killed mid-run, an API that goes away. The run
finishes with every item graded once, and items finished before the fault are not redone."""

import os
import signal
import time

from sqlalchemy import func, select

from db.session import session_scope
from db.tables import Job, JobResult
from tests.evals.conftest import ANATOMY_DEV, EVAL_MODEL, write_cais_csv, write_jsonl
from tests.evals.test_runs import items_of, start_run, wait_for_run
from tests.factories import start_worker, stop_worker, wait_for_queue

FAULT_MODEL, FAULT_QUEUE = "tiny-faults", "llmq.tiny-faults.cpu"
LONG_TEST = [
    {"question": f"Sam has {n} cats. How many cats?", "answer": f"{n} cats.\n#### {n}"}
    for n in range(24)
]
# Distinct questions (a repeated one would reuse the first one's job).
LONG_MMLU_TEST = [
    (f"Which bone is number {n}?", ["arm", "leg", "skull", "hand"], n % 4) for n in range(240)
]


def job_rows(database_url, job_ids) -> dict[str, tuple[str, int, int]]:
    """status, attempts and stored results of each job."""
    with session_scope(database_url) as session:
        results = func.count(JobResult.job_id)
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, results)
            .outerjoin(JobResult, JobResult.job_id == Job.id)
            .where(Job.id.in_(job_ids))
            .group_by(Job.id)
        )
        return {str(r.id): (r.status, r.attempts, r[3]) for r in rows}


def test_worker_killed_mid_gsm8k_run_loses_nothing(
    client, database_url, eval_data, tiny_model_path
):
    write_jsonl(eval_data / "gsm8k-long" / "train.jsonl", LONG_TEST)
    write_jsonl(eval_data / "gsm8k-long" / "test.jsonl", LONG_TEST)
    body = {"benchmark": "gsm8k", "num_fewshot": 0, "dataset": "gsm8k-long"}
    kill_worker_mid_run(client, database_url, body, len(LONG_TEST))


def test_worker_killed_mid_mmlu_run_loses_nothing(client, database_url, eval_data, tiny_model_path):
    """MMLU items travel in groups (llmq.score_group): the killed worker's group is lost with
    it, and its jobs are requeued one by one."""
    write_cais_csv(eval_data / "mmlu-long" / "dev" / "anatomy_dev.csv", ANATOMY_DEV)
    write_cais_csv(eval_data / "mmlu-long" / "test" / "anatomy_test.csv", LONG_MMLU_TEST)
    body = {"benchmark": "mmlu", "num_fewshot": 0, "dataset": "mmlu-long", "subjects": ["anatomy"]}
    kill_worker_mid_run(client, database_url, body, len(LONG_MMLU_TEST))


def kill_worker_mid_run(client, database_url, body: dict, total: int) -> None:
    first = start_worker(FAULT_MODEL)
    second = None
    try:
        wait_for_queue(FAULT_QUEUE, first)
        run = start_run(client, {**body, "model": FAULT_MODEL})
        deadline = time.monotonic() + 120
        while True:
            progress = client.get(f"/v1/evals/{run['id']}").json()["progress"]
            if progress["done"] >= 4:
                break
            assert time.monotonic() < deadline, progress
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        before = {
            i["position"]: i["job_id"]
            for i in items_of(client, run["id"])
            if i["status"] == "succeeded"
        }
        assert 4 <= len(before) < total, "the kill must land mid-run"
        second = start_worker(FAULT_MODEL)
        wait_for_queue(FAULT_QUEUE, second)
        done = wait_for_run(client, run["id"], timeout=240)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                stop_worker(process)
    assert done["progress"]["done"] == done["progress"]["total"] == total
    assert done["progress"]["failed"] == 0
    items = items_of(client, run["id"])
    assert all(i["status"] == "succeeded" for i in items)
    jobs = job_rows(database_url, [i["job_id"] for i in items])
    assert len(jobs) == total  # one job per item: none made twice
    assert all(status == "succeeded" and results == 1 for status, _, results in jobs.values())
    for position, job_id in before.items():
        assert items[position]["job_id"] == job_id
        assert jobs[job_id][1] == 1  # finished before the kill: never run again


def test_run_started_by_one_api_process_is_finished_by_another(app, client, eval_worker, eval_data):
    """The driver keeps nothing in memory: a new process's driver picks the run up from
    Postgres wherever the last one left it."""
    from api.background.eval_driver import EvalDriver

    def fresh_driver() -> EvalDriver:
        return EvalDriver(
            app.state.settings,
            app.state.registry,
            app.state.prompt_counter,
            app.state.live_queues,
        )

    app.state.eval_driver.stop()  # this "process" goes away
    try:
        body = {
            "benchmark": "mmlu",
            "model": EVAL_MODEL,
            "num_fewshot": 0,
            "subjects": ["abstract_algebra", "anatomy"],
        }
        run = start_run(client, body)
        # Another API process of the suite (the uvicorn one) may drive the run too; any may.
        first = fresh_driver()
        first.sweep()  # plans and sends the first jobs, then its process is gone
        assert client.get(f"/v1/evals/{run['id']}").json()["status"] in ("running", "succeeded")
        second = fresh_driver()
        deadline = time.monotonic() + 60
        while client.get(f"/v1/evals/{run['id']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            second.sweep()
            time.sleep(0.1)
    finally:
        app.state.eval_driver = fresh_driver()
        app.state.eval_driver.start()
    done = client.get(f"/v1/evals/{run['id']}").json()
    assert done["progress"]["done"] == 5
    assert len({i["job_id"] for i in items_of(client, run["id"])}) == 5
