"""tenants.is_admin: admin tenants may use the operator routes

Revision ID: 0003_r
Revises: 0003_i
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_r"
down_revision: str | None = "0003_i"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("is_admin")
