"""Migrations apply to an empty database and downgrade cleanly."""

from sqlalchemy import create_engine, inspect

from tests.conftest import DATABASE_URL
from tests.factories import create_database, downgrade, drop_database, migrate

EMPTY_DB_URL = DATABASE_URL.replace("/llmq_test_", "/llmq_test_migrations_")
TABLES = {"jobs", "job_results", "usage", "completion_cache"}


def _tables() -> set[str]:
    engine = create_engine(EMPTY_DB_URL)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_upgrade_empty_database_then_downgrade_to_nothing():
    create_database(EMPTY_DB_URL, replace=True)
    try:
        migrate(EMPTY_DB_URL, "head")
        assert TABLES <= _tables()
        downgrade(EMPTY_DB_URL, "base")
        assert _tables() <= {"alembic_version"}
        migrate(EMPTY_DB_URL, "head")
        assert TABLES <= _tables()
    finally:
        drop_database(EMPTY_DB_URL)


def test_models_match_migrations(database_url):
    """Autogenerate finds nothing to do: tables and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from db.base import Base

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
