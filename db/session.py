"""Engines and session factories, one per database URL, created once per process."""

import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from llmq.settings import get_settings

# A process that stops mid-transaction (frozen, partitioned) would hold its row locks for ever
# and stall every writer behind it; Postgres ends such a session after this long instead.
# No transaction of llmq waits on anything else for more than a few seconds.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
IDLE_TIMEOUT_OPTION = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"

_lock = threading.Lock()
_factories: dict[str, sessionmaker[Session]] = {}


def get_sessionmaker(database_url: str) -> sessionmaker[Session]:
    # A lock, not lru_cache: many threads start at once in a worker, and each engine they raced
    # to create would bring its own connection pool.
    with _lock:
        factory = _factories.get(database_url)
        if factory is None:
            settings = get_settings()
            # Looked up when called: tracing (llmq/tracing.py) wraps it after this import.
            engine = sqlalchemy.create_engine(
                database_url,
                pool_size=settings.db_pool_size,
                max_overflow=settings.db_max_overflow,
                # A bounded wait: past it the caller fails (the API answers 503) instead of
                # queueing behind a pool that may never free up.
                pool_timeout=settings.db_pool_timeout_s,
                connect_args={"options": IDLE_TIMEOUT_OPTION},
            )
            event.listen(engine, "checkout", _replace_if_closed(engine))
            factory = _factories[database_url] = sessionmaker(engine, expire_on_commit=False)
        return factory


def _replace_if_closed(engine: Engine):
    """A pool checkout hook that hands out no connection the server has closed (a restart, a
    terminated backend, an idle timeout), without a round trip for every checkout as SQLAlchemy's
    pre-ping makes (a job's path checks out two or three connections). An idle connection has
    nothing to read; one that does has the server's goodbye, or rarely a notice, so only then
    is it pinged. A connection found dead is replaced by a fresh one (DisconnectionError)."""

    def checkout(dbapi_connection, _record, _proxy) -> None:
        if dbapi_connection.closed:
            raise DisconnectionError("the connection was closed")
        readable = select.poll()
        readable.register(dbapi_connection.fileno(), select.POLLIN)
        if not readable.poll(0):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"the server closed the connection: {exc}") from exc

    return checkout


def get_engine(database_url: str) -> Engine:
    return get_sessionmaker(database_url).kw["bind"]


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with get_sessionmaker(database_url)() as session, session.begin():
        yield session
