"""The background window: how many more background jobs (Batch API lines, evaluation items)
each model takes now.

Background jobs are released to the broker as the model's workers take them, not all at once:
at most `ModelSpec.background_window` of them per live worker are queued or running, across
every batch and evaluation run. A worker's Celery threads then never all hold background jobs,
so an interactive job is picked up at once, and a cancelled batch or run leaves few messages
behind. The Batch driver and the evaluation driver share the window.
"""

from sqlalchemy.orm import Session

from api.fleet.live_workers import LiveQueues
from db.queries import jobs as job_queries
from llmq.registry import Registry


def background_room(session: Session, registry: Registry, live: LiveQueues) -> dict[str, int]:
    """Per served model, the background jobs it may still be given (0 or less: none)."""
    in_flight = job_queries.open_background_jobs(session)
    room = {}
    for spec in registry.models:
        workers = sum(live.consumers[spec.queue(device)] for device in spec.devices)
        room[spec.id] = max(1, workers) * spec.background_window - in_flight.get(spec.id, 0)
    return room
