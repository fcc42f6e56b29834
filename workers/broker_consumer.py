"""Celery's consumer, reconnecting to the broker within a second or two of its return.

Celery retries a lost broker connection at kombu's default intervals, 2 s longer each time up to
30 s, so a worker could sit idle for half a minute after Redis came back. Here the wait grows by
half a second up to `RECONNECT_MAX_S`; one connection attempt to a local Redis costs
a refused TCP connect, so trying often costs nothing while it is away.
"""

from functools import partial

from celery.worker.consumer import Consumer

RECONNECT_START_S = 0.5
RECONNECT_STEP_S = 0.5
RECONNECT_MAX_S = 2.0


class BrokerConsumer(Consumer):
    def ensure_connected(self, conn):
        conn.ensure_connection = partial(
            conn.ensure_connection,
            interval_start=RECONNECT_START_S,
            interval_step=RECONNECT_STEP_S,
            interval_max=RECONNECT_MAX_S,
        )
        return super().ensure_connected(conn)
