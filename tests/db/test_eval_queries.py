"""The evaluation driver's sweep queries against a real Postgres, through one item's life: no
job yet, a job in flight, a job ended, graded. The sweeps read partial indexes that hold only
the items in the first states, so these are checked at each step."""

from sqlalchemy import text

from db.queries import evals as eval_queries
from db.queries import jobs as job_queries
from db.session import get_sessionmaker
from llmq.protocol import JobKind, JobStatus

MODEL = "sweep-rows"  # no worker serves it


def test_sweep_queries_follow_items_from_plan_to_grade(database_url):
    # One transaction, rolled back: the driver of a running API never sees this run.
    with get_sessionmaker(database_url)() as session:
        run = eval_queries.create_run(
            session, eval_queries.NewRun("gsm8k", MODEL, 0, 3, None, "fixture")
        )
        items = [
            eval_queries.NewItem(
                position,
                "gsm8k",
                position,
                JobKind.GENERATE.value,
                {},
                {},
                f"key-{run.id}-{position}",
                "1",
            )
            for position in range(3)
        ]
        eval_queries.store_plan(session, run, items)
        assert eval_queries.has_ungraded(session, run.id)
        assert [i.position for i in eval_queries.next_requests(session, run.id, 2)] == [0, 1]

        jobs = {}
        for item in eval_queries.next_requests(session, run.id, 2):
            new = job_queries.NewJob(
                kind=item.kind, model=MODEL, queue=f"llmq.{MODEL}.cpu", input={}, params={}
            )
            jobs[item.position] = job_queries.create_job(session, new)
            eval_queries.assign_jobs(session, run.id, [(item.request_key, jobs[item.position].id)])
        session.flush()
        # Item 2 still waits for a job; 0 and 1 have one in flight, so none is finished.
        assert [i.position for i in eval_queries.next_requests(session, run.id, 5)] == [2]
        assert eval_queries.finished_items(session, run.id, 10) == []

        jobs[1].status = JobStatus.FAILED.value
        session.flush()
        finished = eval_queries.finished_items(session, run.id, 10)
        assert [f.job_status for f in finished] == [JobStatus.FAILED.value]

        grade = {"output": None, "details": None, "metrics": None, "error": "failed"}
        eval_queries.store_grades(session, [grade | {"id": finished[0].item_id}])
        assert eval_queries.finished_items(session, run.id, 10) == []
        assert eval_queries.has_ungraded(session, run.id)  # 0 in flight, 2 without a job

        # Grade the rest by hand: nothing is left, and both partial indexes are empty for it.
        session.execute(
            text("UPDATE eval_items SET graded_at = now() WHERE run_id = :run"), {"run": run.id}
        )
        assert not eval_queries.has_ungraded(session, run.id)
        assert eval_queries.progress(session, run.id, 3).graded == 3
        session.rollback()
