"""Scenes: a directed conversation between personas in a room, with a turn budget.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per scene; the active one of a room is driven turn by turn, and a
    # restart finds it here and carries on.
    op.create_table(
        "scenes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("personas", sa.Text, nullable=False),  # JSON list of names, speaking order
        sa.Column("turn_order", sa.Text, nullable=False),  # round_robin | mention
        sa.Column("topic", sa.Text, nullable=False, server_default=""),
        sa.Column("max_turns", sa.Integer, nullable=False),
        sa.Column("turns_taken", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_speaker", sa.Text),  # persona name
        sa.Column("requested", sa.Text),  # a participant a human addressed: it speaks next
        sa.Column("requested_event", sa.Text),  # the message that addressed it: its answer
        sa.Column("state", sa.Text, nullable=False),  # active | ended
        sa.Column("end_reason", sa.Text),  # turns | nobody | stopped | room_stopped
        sa.Column("started_by", sa.Text, nullable=False),
        sa.Column("stopped_by", sa.Text),  # who ran !scene stop
        sa.Column("started_at", sa.BigInteger, nullable=False),
        sa.Column("ended_at", sa.BigInteger),
    )
    # One scene at a time per room.
    op.create_index(
        "scenes_active_room",
        "scenes",
        ["room_id"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_index("scenes_room", "scenes", ["room_id", "id"])


def downgrade() -> None:
    op.drop_index("scenes_room", "scenes")
    op.drop_index("scenes_active_room", "scenes")
    op.drop_table("scenes")
