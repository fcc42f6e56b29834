"""Whether the Postgres and the Redis that a URL names answer, and waiting until they do."""

import time
from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg
import redis
from sqlalchemy.engine import make_url

ANSWER_TIMEOUT_S = 30.0


def admin_conninfo(url: str) -> str:
    """A libpq URI for the `postgres` database on the server that an SQLAlchemy URL names."""
    admin = make_url(url).set(drivername="postgresql", database="postgres")
    return admin.render_as_string(hide_password=False)


def redacted(url: str) -> str:
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


def postgres_problem(url: str) -> str | None:
    """Why the Postgres server the URL names does not answer, or None when it does."""
    try:
        psycopg.connect(admin_conninfo(url), connect_timeout=2).close()
    except psycopg.OperationalError as exc:
        return str(exc).strip()
    return None


def redis_problem(url: str) -> str | None:
    """Why the Redis the URL names does not answer, or None when it does."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return str(exc).strip()
    finally:
        client.close()
    return None


def wait_until_answers(problem: Callable[[str], str | None], url: str, what: str) -> None:
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while (reason := problem(url)) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"devstack: {what} at {redacted(url)} did not answer in "
                f"{ANSWER_TIMEOUT_S:.0f} s: {reason}"
            )
        time.sleep(1)
