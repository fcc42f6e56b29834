"""The background window: Batch API lines and evaluation items share each model's room."""

import uuid

from api.background.window import background_room
from api.fleet.live_workers import LiveQueues
from db.queries import jobs as job_queries
from db.session import get_sessionmaker
from llmq.protocol import BATCH_PRIORITY, JobStatus
from llmq.registry import ModelSpec, Registry


def test_batch_lines_and_evaluation_items_count_against_one_window(database_url):
    spec = ModelSpec(id=f"window-{uuid.uuid4().hex[:8]}", source="builtin:tiny-llama")
    registry = Registry(models=[spec])
    live = LiveQueues(app=None, interval_s=60)  # not started: its consumers are set by hand

    # One transaction, rolled back: no other process (the reconciler of a running API) ever
    # sees these jobs.
    with get_sessionmaker(database_url)() as session:

        def job(priority: int, status=JobStatus.QUEUED, batch_id=None, worker=None):
            new = job_queries.NewJob(
                kind="generate",
                model=spec.id,
                queue=spec.queue("cpu"),
                input={"prompt": "x"},
                params={},
                priority=priority,
                batch_id=batch_id,
            )
            row = job_queries.create_job(session, new)
            row.status, row.worker = status.value, worker
            session.flush()

        assert background_room(session, registry, live) == {spec.id: spec.background_window}
        job(BATCH_PRIORITY, batch_id="batch_1")  # a Batch API line
        job(BATCH_PRIORITY, JobStatus.RUNNING, worker="w@host")  # an evaluation item
        job(BATCH_PRIORITY, JobStatus.SUCCEEDED)  # ended: no longer in the window
        job(0)  # interactive: never in the window
        room = background_room(session, registry, live)
        assert room == {spec.id: spec.background_window - 2}
        live.consumers[spec.queue("cpu")] = 3  # three live workers: three windows
        room = background_room(session, registry, live)
        assert room == {spec.id: 3 * spec.background_window - 2}
        session.rollback()
