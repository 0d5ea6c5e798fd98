"""Trusted users granted at run time with !trust.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trusted_users",
        sa.Column("mxid", sa.Text, primary_key=True),
        sa.Column("granted_by", sa.Text, nullable=False),
        sa.Column("granted_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("trusted_users")
