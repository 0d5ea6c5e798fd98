"""Tools: each persona's tool list and choice; the calls a reply made, with their results.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("personas") as batch:
        # JSON list of tool names; NULL means the config's tools.default.
        batch.add_column(sa.Column("tools", sa.Text))
        # auto (NULL), required, or a tool name: what the first step of a reply must do.
        batch.add_column(sa.Column("tool_choice", sa.Text))
    # Every tool call a reply made, with its result: stored with the reply, so later
    # prompts (and !context, summaries) see what the persona looked up.
    op.create_table(
        "tool_calls",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.Text, nullable=False),  # the message answered
        sa.Column("persona", sa.Text, nullable=False),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("hop", sa.Integer, nullable=False),
        sa.Column("call_id", sa.Text, nullable=False),
        sa.Column("tool", sa.Text, nullable=False),
        sa.Column("arguments", sa.Text, nullable=False),  # JSON object
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("reply_event_id", sa.Text),  # the final reply, once it is out
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("tool_calls_reply", "tool_calls", ["room_id", "reply_event_id"])
    op.create_index("tool_calls_job", "tool_calls", ["event_id", "persona"])


def downgrade() -> None:
    op.drop_index("tool_calls_job", "tool_calls")
    op.drop_index("tool_calls_reply", "tool_calls")
    op.drop_table("tool_calls")
    with op.batch_alter_table("personas") as batch:
        batch.drop_column("tool_choice")
        batch.drop_column("tools")
