"""named schemas: JSON Schemas stored under a name per key, for structured output

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 08:30:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'named_schemas',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('owner', sa.String(length=200), nullable=True),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('description', sa.Text(), nullable=True),
        sa.Column('schema', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            'created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('owner', 'name', name='uq_named_schemas_owner_name'),
    )


def downgrade() -> None:
    op.drop_table('named_schemas')
