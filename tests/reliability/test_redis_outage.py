"""Redis stopped under working workers and restarted empty: the workers live on, reconnect by
themselves, and every accepted job succeeds once, its lost message sent again within seconds.

Each test runs a Redis server of its own that it stops and starts, with no persistence, so its
queues are gone when it comes back (the worst case of a broker restart)."""

import contextlib
import socket
import time

import httpx
import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.common import ignore_errors
from sqlalchemy.engine import make_url

from bench.servers import PrivateRedis, free_port
from db.admin import create_database, drop_database, migrate
from db.session import get_engine
from tests.factories import AUTH, start_api, start_worker, stop_worker
from tests.faults import (
    LONG_JOB,
    MODEL,
    QUEUE,
    assert_each_succeeded_once,
    statuses,
    wait_until,
)
from workers import broker_transport


@pytest.fixture
def own_redis(tmp_path):
    server = PrivateRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_database(database_url):
    """A database of the test's own: the suite's API, on the suite's Redis, would otherwise
    judge this test's workers (which it cannot hear) lost and move their jobs to its broker."""
    url = make_url(database_url)
    own = url.set(database=f"{url.database}_outage").render_as_string(False)
    create_database(own, replace=True)
    migrate(own, "head")
    yield own
    get_engine(own).dispose()
    drop_database(own)


def consumes(redis_url: str, queue: str) -> bool:
    app = Celery(broker=redis_url)
    try:
        replies = app.control.inspect(timeout=0.5).active_queues() or {}
    finally:
        app.close()
    return any(q["name"] == queue for queues in replies.values() for q in queues)


def test_a_connection_lost_while_holding_messages_closes_with_connection_errors_only(own_redis):
    """What Celery 5.7 does when the broker goes away under a consuming worker: collect() the
    connection, then close() it, letting only connection errors pass. A worker holding
    unacknowledged messages on two channels, one of them waiting in BRPOP, used to meet an
    AttributeError there, and stop ("Unrecoverable error")."""
    queue = Queue("outage-test", Exchange("outage-test"), "outage-test")
    connection = Connection(own_redis.url, transport=broker_transport.Transport)
    held = []
    for channel in (connection.default_channel, connection.channel()):
        Producer(channel).publish(
            {}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue]
        )
        held.append(queue(channel).get(no_ack=False))  # delivered, not acknowledged: in flight
    Consumer(connection.default_channel, [queue], no_ack=False).consume()
    with contextlib.suppress(socket.timeout):
        connection.drain_events(timeout=0.2)  # a BRPOP outstanding, as a worker with a free thread

    own_redis.stop()
    connection.collect(socket_timeout=1)
    ignore_errors(connection, connection.close)  # raised AttributeError before the fix
    for message in held:  # task threads acknowledging their finished jobs late
        ignore_errors(connection, message.ack)


def test_workers_survive_a_redis_outage_with_jobs_in_flight(
    own_redis, own_database, tiny_model_path
):
    # The requeue timer is out of reach here: only noticing the lost broker data sends again.
    env = {
        "LLMQ_REDIS_URL": own_redis.url,
        "LLMQ_DATABASE_URL": own_database,
        "LLMQ_REQUEUE_AFTER_S": "600",
    }
    database_url = own_database
    api, base = start_api(**env)
    workers = [start_worker(MODEL, **env) for _ in range(2)]
    try:
        wait_until(lambda: consumes(own_redis.url, QUEUE), 120, "the workers to consume")
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as client:
            job_ids = [
                client.post("/v1/jobs", json={**LONG_JOB, "prompt": f"outage {i}"}).json()["id"]
                for i in range(24)
            ]
        wait_until(
            lambda: list(statuses(database_url, job_ids).values()).count("running") >= 4,
            60,
            "jobs to run",
        )
        own_redis.stop()
        time.sleep(5)
        assert [w.poll() for w in workers] == [None, None]
        own_redis.start()  # empty: the queued jobs' messages are gone
        returned = time.monotonic()

        assert_each_succeeded_once(database_url, job_ids)
        assert [w.poll() for w in workers] == [None, None], "a worker exited"
        drained_s = time.monotonic() - returned
        assert drained_s < 60, drained_s
    finally:
        for process in (*workers, api):
            stop_worker(process)
