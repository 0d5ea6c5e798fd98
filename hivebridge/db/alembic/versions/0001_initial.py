"""Initial schema: personas, their rooms, rooms, messages, processed transactions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "personas",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("mxid", sa.Text, nullable=False, unique=True),
        sa.Column("displayname", sa.Text, nullable=False),
        sa.Column("avatar_url", sa.Text),
        sa.Column("system_prompt", sa.Text, nullable=False),
        sa.Column("traits", sa.Text, nullable=False, server_default="{}"),
        sa.Column("model", sa.Text),
        sa.Column("profile", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.Text),
    )
    op.create_table(
        "rooms",
        sa.Column("room_id", sa.Text, primary_key=True),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        # Conversation context starts at this timestamp (ms); set by !reset.
        sa.Column("context_since", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "persona_rooms",
        sa.Column(
            "persona",
            sa.Text,
            sa.ForeignKey("personas.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("room_id", sa.Text, primary_key=True),
        sa.Column("joined_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("msgtype", sa.Text),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("thread_root", sa.Text),
        sa.Column("in_reply_to", sa.Text),
        sa.Column("ts", sa.BigInteger, nullable=False),
        # Name of the persona that sent it, for messages of our own.
        sa.Column("persona", sa.Text),
        # Routing finished; unhandled messages are resumed at start.
        sa.Column("handled", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("messages_room_ts", "messages", ["room_id", "ts"])
    op.create_table(
        "processed_txns",
        sa.Column("txn_id", sa.Text, primary_key=True),
        sa.Column("processed_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("processed_txns")
    op.drop_index("messages_room_ts", "messages")
    op.drop_table("messages")
    op.drop_table("persona_rooms")
    op.drop_table("rooms")
    op.drop_table("personas")
