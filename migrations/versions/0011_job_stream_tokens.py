"""job stream_tokens: whether a job's text is published token by token as it is generated, or
whole when it ends (a non-streamed OpenAI request's job, which nobody watches token by token)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 06:00:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        'jobs',
        sa.Column('stream_tokens', sa.Boolean(), server_default=sa.true(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column('jobs', 'stream_tokens')
