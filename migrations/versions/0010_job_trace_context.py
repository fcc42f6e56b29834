"""job trace context: the W3C traceparent of the request that created a job, so that a worker,
a re-send by the reconciler or a takeover after a crash continues the same trace

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-14 09:00:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('trace_context', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'trace_context')
