"""Retrying a worker's Postgres writes while Postgres is briefly away, so that no job is
acknowledged before its outcome is stored."""

import psycopg
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential_jitter


def _is_transient(exc: BaseException) -> bool:
    """Lost or refused connections: how Postgres being away, restarting or cut off shows; and
    a connection pool that stayed busy past its timeout (a burst of results at once)."""
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, DBAPIError):
        return (
            exc.connection_invalidated
            or isinstance(exc.orig, psycopg.OperationalError | psycopg.InterfaceError)
            or isinstance(exc, OperationalError | InterfaceError)
        )
    return isinstance(exc, DisconnectionError | ConnectionError)


db_retry = retry(
    retry=retry_if_exception(_is_transient),
    wait=wait_exponential_jitter(multiplier=0.2, max=10),
    stop=stop_after_delay(600),
    reraise=True,
)
