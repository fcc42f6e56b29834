"""job delivery: request id, last enqueue time and per-job timeout

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:10:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('request_id', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('jobs', sa.Column('timeout_s', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'timeout_s')
    op.drop_column('jobs', 'enqueued_at')
    op.drop_column('jobs', 'request_id')
