"""eval runs: runs, their items, and scoring jobs' results

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 06:00:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('score_results',
    sa.Column('job_id', sa.UUID(), nullable=False),
    sa.Column('loglikelihoods', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('greedy', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_score_results_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_score_results'))
    )
    op.create_table('eval_runs',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('benchmark', sa.String(length=16), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('num_fewshot', sa.Integer(), nullable=False),
    sa.Column('limit', sa.Integer(), nullable=True),
    sa.Column('subjects', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('dataset', sa.String(length=1000), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('scores', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_eval_runs'))
    )
    op.create_index('ix_eval_runs_status', 'eval_runs', ['status'], unique=False)
    op.create_table('eval_items',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.UUID(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('task', sa.String(length=100), nullable=False),
    sa.Column('doc_index', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('input', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('request_key', sa.String(length=64), nullable=False),
    sa.Column('gold', sa.Text(), nullable=False),
    sa.Column('job_id', sa.UUID(), nullable=True),
    sa.Column('reused', sa.Boolean(), nullable=False),
    sa.Column('output', sa.Text(), nullable=True),
    sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('metrics', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('graded_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_eval_items_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['run_id'], ['eval_runs.id'], name=op.f('fk_eval_items_run_id_eval_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_eval_items')),
    sa.UniqueConstraint('run_id', 'position', name='uq_eval_items_run_id_position')
    )
    op.create_index('ix_eval_items_job_id', 'eval_items', ['job_id'], unique=False)
    op.create_index('ix_eval_items_request_key', 'eval_items', ['request_key'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_eval_items_request_key', table_name='eval_items')
    op.drop_index('ix_eval_items_job_id', table_name='eval_items')
    op.drop_table('eval_items')
    op.drop_index('ix_eval_runs_status', table_name='eval_runs')
    op.drop_table('eval_runs')
    op.drop_table('score_results')
