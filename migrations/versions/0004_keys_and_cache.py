"""api keys and their limits; cache hits and coalesced jobs; owners of eval runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 06:00:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('rate_limit_per_minute', sa.Integer(), nullable=True),
    sa.Column('max_concurrent_jobs', sa.Integer(), nullable=True),
    sa.Column('monthly_token_quota', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.add_column('jobs', sa.Column('cache_hit', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('jobs', sa.Column('follows_job_id', sa.UUID(), nullable=True))
    op.add_column('jobs', sa.Column('cache_key', sa.String(length=64), nullable=True))
    op.create_index('ix_jobs_follows_job_id', 'jobs', ['follows_job_id'], unique=False)
    op.create_index('ix_jobs_cache_key_status', 'jobs', ['cache_key', 'status'], unique=False)
    op.create_index('ix_jobs_owner_status', 'jobs', ['owner', 'status'], unique=False)
    op.add_column('eval_runs', sa.Column('owner', sa.String(length=200), nullable=True))


def downgrade() -> None:
    op.drop_column('eval_runs', 'owner')
    op.drop_index('ix_jobs_owner_status', table_name='jobs')
    op.drop_index('ix_jobs_cache_key_status', table_name='jobs')
    op.drop_index('ix_jobs_follows_job_id', table_name='jobs')
    op.drop_column('jobs', 'cache_key')
    op.drop_column('jobs', 'follows_job_id')
    op.drop_column('jobs', 'cache_hit')
    op.drop_table('api_keys')
