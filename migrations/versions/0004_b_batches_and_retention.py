"""batches of jobs, batch webhooks, and expired jobs (retention)

Revision ID: 0004_b
Revises: 0003_g
Create Date: 2026-11-26 10:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import shared.tables


revision: str = '0004_b'
down_revision: str | None = '0003_g'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('batches',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('remaining', sa.Integer(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('created_at', shared.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('canceled_at', shared.tables.UTCDateTime(timezone=True), nullable=True),
    sa.Column('completed_at', shared.tables.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index('ix_batches_tenant_created', ['tenant_id', 'created_at', 'id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('batch_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('ended_as', sa.String(length=16), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_batch_id'), ['batch_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_batch_id_batches', 'batches', ['batch_id'], ['id'], ondelete='CASCADE')

    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.String(length=32), nullable=True))
        batch_op.alter_column('job_id', existing_type=sa.String(length=32), nullable=True)
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_batch_id'), ['batch_id'], unique=False)
        batch_op.create_foreign_key(
            'fk_webhook_deliveries_batch_id_batches', 'batches', ['batch_id'], ['id'], ondelete='CASCADE'
        )


def downgrade() -> None:
    # Batch deliveries have no job; the older schema cannot hold them.
    op.execute("DELETE FROM webhook_deliveries WHERE job_id IS NULL")
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_constraint('fk_webhook_deliveries_batch_id_batches', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_batch_id'))
        batch_op.alter_column('job_id', existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column('batch_id')

    # Expired jobs go back to the status they had ended with (their objects stay deleted).
    op.execute("UPDATE jobs SET status = ended_as WHERE status = 'expired' AND ended_as IS NOT NULL")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_batch_id_batches', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_batch_id'))
        batch_op.drop_column('ended_as')
        batch_op.drop_column('batch_index')
        batch_op.drop_column('batch_id')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index('ix_batches_tenant_created')
    op.drop_table('batches')
