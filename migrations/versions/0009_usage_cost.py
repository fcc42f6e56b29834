"""usage cost: each usage row's cost at the price in force when its job finished, and a
monthly spend limit per API key

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:00:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('usage', sa.Column('cost', sa.Numeric(precision=20, scale=10), nullable=True))
    op.add_column('usage', sa.Column('currency', sa.String(length=3), nullable=True))
    op.add_column(
        'api_keys',
        sa.Column('monthly_spend_limit', sa.Numeric(precision=16, scale=4), nullable=True),
    )


def downgrade() -> None:
    op.drop_column('api_keys', 'monthly_spend_limit')
    op.drop_column('usage', 'currency')
    op.drop_column('usage', 'cost')
