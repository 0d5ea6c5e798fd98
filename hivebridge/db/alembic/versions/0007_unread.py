"""Encrypted events waiting for their room key, so a restart does not lose them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The event as the homeserver sent it (still encrypted) and when it came: at
    # start each waits out the rest of its time, or is said to be unreadable.
    op.create_table(
        "encrypted_waiting",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),  # JSON
        sa.Column("received_at", sa.BigInteger, nullable=False),  # ms
    )


def downgrade() -> None:
    op.drop_table("encrypted_waiting")
