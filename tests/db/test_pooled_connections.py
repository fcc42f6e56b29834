"""Pooled connections against a real Postgres: one whose backend the server ended is replaced
at checkout, a live one is handed out again without a statement, and one with input nobody
asked for (a notification) is checked with a round trip and kept."""

import select
from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import text

from db.session import get_engine


@pytest.fixture
def pooled(database_url) -> Iterator[sqlalchemy.Engine]:
    """The process's engine for the test database, its pool emptied: the first connection a
    test opens and returns is the one the next checkout gets."""
    engine = get_engine(database_url)
    engine.dispose()
    yield engine
    engine.dispose()


@pytest.fixture
def other(database_url) -> Iterator[sqlalchemy.Connection]:
    """A connection of an engine of its own, outside the pool under test."""
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        yield connection
    engine.dispose()


def pooled_connection(engine: sqlalchemy.Engine):
    """The pooled connection's pid and its driver connection, returned to the pool."""
    with engine.connect() as connection:
        driver = connection.connection.dbapi_connection
        return driver.info.backend_pid, driver


def wait_readable(driver, timeout_s: float = 5.0) -> bool:
    poller = select.poll()
    poller.register(driver.fileno(), select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def last_statement(other: sqlalchemy.Connection, pid: int) -> str:
    # Each read in its own transaction: a transaction sees one snapshot of the statistics.
    query = text("SELECT query FROM pg_stat_activity WHERE pid = :pid")
    return other.execute(query, {"pid": pid}).scalar_one()


def test_connection_ended_by_the_server_is_replaced_at_checkout(pooled, other):
    pid, driver = pooled_connection(pooled)
    # As a restart, an administrator or an idle timeout would end it, while it waits in the pool.
    other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    assert wait_readable(driver)  # the server's goodbye
    with pooled.connect() as connection:
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid


def test_live_connection_is_handed_out_without_a_round_trip(pooled, other):
    pid, _ = pooled_connection(pooled)
    before = last_statement(other, pid)
    for _ in range(3):
        with pooled.connect() as connection:
            assert connection.connection.dbapi_connection.info.backend_pid == pid
    assert last_statement(other, pid) == before


def test_connection_with_unread_input_is_pinged_and_kept(pooled, other):
    with pooled.connect() as connection:
        connection.execute(text("LISTEN llmq_pool_test"))
        connection.commit()
        driver = connection.connection.dbapi_connection
        pid = driver.info.backend_pid
    other.execute(text("NOTIFY llmq_pool_test"))
    assert wait_readable(driver)  # the notification, unread while the connection is pooled
    with pooled.connect() as connection:
        # Checked out, no statement run yet: the checkout's round trip read it.
        assert not wait_readable(driver, timeout_s=0)
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() == pid
