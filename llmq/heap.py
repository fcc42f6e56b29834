"""The garbage collector of a long-running llmq process, set once the process has started.

CPython's cycle collector runs a young collection every 700 net allocations and, now and then,
a full one over every tracked object. An API or worker process holds a few hundred thousand
objects from its imports and start-up (FastAPI, SQLAlchemy, Celery, Transformers) that live as
long as it does, and a job allocates thousands: so the collector ran over a thousand times per
few thousand jobs, a full collection walked all those start-up objects each time, and the
request objects alive at each young collection were walked again and again. Measured under the
one-token job benchmark, that was most of a millisecond of CPU per job in the API alone.

`settle` runs once start-up is done (the API's lifespan, a worker's `worker_ready`, an engine
process once its model is loaded): it collects, moves everything alive to the permanent
generation (`gc.freeze`, which CPython provides for long-lived servers), so full collections
walk only what came after, and raises the young generation's threshold. Objects freed by
reference counting, which is nearly all of a job's, are freed at once as before; only garbage
in reference cycles waits a little longer for its collection.
"""

import gc

import structlog

log = structlog.get_logger(__name__)


def settle(young_threshold: int) -> None:
    """Freeze what start-up left alive and collect the young generation every
    `young_threshold` allocations (0: leave the collector as CPython set it)."""
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    log.debug("heap settled", frozen=gc.get_freeze_count(), young_threshold=young_threshold)
