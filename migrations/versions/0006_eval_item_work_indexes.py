"""evaluation items: partial indexes for the driver's sweeps

The driver looks, several times a second, for a run's items with no job yet and for its items
whose job may have ended but which are not graded. Through the (run_id, position) index both
walked every item before them, so a sweep cost grew with the run (14,042 items for MMLU).
These indexes hold only those items: a sweep reads about the items it works on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 17:15:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_eval_items_unassigned', 'eval_items', ['run_id', 'position'], unique=False,
        postgresql_where=sa.text('job_id IS NULL AND graded_at IS NULL'),
    )
    op.create_index(
        'ix_eval_items_ungraded', 'eval_items', ['run_id', 'position'], unique=False,
        postgresql_where=sa.text('job_id IS NOT NULL AND graded_at IS NULL'),
    )


def downgrade() -> None:
    op.drop_index('ix_eval_items_ungraded', table_name='eval_items')
    op.drop_index('ix_eval_items_unassigned', table_name='eval_items')
