"""Postgres and Redis for the stack: the configured ones, waited for, or at the default
addresses, with the embedded servers started where nothing answers there."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from llmq.settings import Settings
from ops.console import BIN, say
from ops.embedded_servers import start_embedded_postgres, start_embedded_redis
from ops.probes import admin_conninfo, postgres_problem, redis_problem, wait_until_answers


@dataclass
class Services:
    database_url: str
    redis_url: str
    stoppers: list[Callable[[], None]]  # for the embedded servers this process started


def ensure_database(url: str) -> None:
    """Create the URL's database on its server if it is missing."""
    database = make_url(url).database
    with psycopg.connect(admin_conninfo(url), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if found is None:
            say(f"creating database {database}")
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def ensure_postgres(
    url: str, explicit: bool, data_dir: Path, keep: bool
) -> tuple[str, Callable[[], None] | None]:
    """The URL of a Postgres that answers, and how to stop it when it was started here."""
    stop = None
    if explicit:
        wait_until_answers(postgres_problem, url, "Postgres")
    elif postgres_problem(url) is not None:
        url, stop = start_embedded_postgres(url, data_dir, keep)
    ensure_database(url)
    return url, stop


def ensure_redis(url: str, explicit: bool, data_dir: Path, keep: bool) -> Callable[[], None] | None:
    """Make sure a Redis answers at the URL; return how to stop it when it was started here."""
    if explicit:
        wait_until_answers(redis_problem, url, "Redis")
    elif redis_problem(url) is not None:
        return start_embedded_redis(url, data_dir, keep)
    return None


def ensure_services(settings: Settings, keep: bool) -> Services:
    """Postgres and Redis that answer, with the llmq database in place."""
    explicit = settings.model_fields_set  # fields set by the environment or .env
    database_url, stop_postgres = ensure_postgres(
        settings.database_url, "database_url" in explicit, settings.data_dir, keep
    )
    try:
        stop_redis = ensure_redis(
            settings.redis_url, "redis_url" in explicit, settings.data_dir, keep
        )
    except BaseException:
        if stop_postgres is not None:
            stop_postgres()
        raise
    stoppers = [stop for stop in (stop_postgres, stop_redis) if stop is not None]
    return Services(database_url, settings.redis_url, stoppers)


def stop_services(stack: Services) -> None:
    for stop in stack.stoppers:
        stop()


def child_env(stack: Services) -> dict[str, str]:
    return os.environ | {
        "LLMQ_DATABASE_URL": stack.database_url,
        "LLMQ_REDIS_URL": stack.redis_url,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
