"""Model catalogue, endpoints, usage and limits, chapter summaries, reply jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Stable numeric ids for every model name ever seen, local or remote.
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("first_seen", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "aliases",
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column(
            "model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("created_by", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    # Endpoints added at run time (!add_endpoint); config endpoints are not stored.
    op.create_table(
        "endpoints",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("api_key", sa.Text),
        sa.Column("created_by", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    # One row per answered request: the source of !stats and of daily budgets.
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("day", sa.Text, nullable=False),  # UTC YYYY-MM-DD
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("persona", sa.Text),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),  # reply | ask | summary
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("usage_day_user", "usage", ["day", "user_id"])
    op.create_index("usage_day_room", "usage", ["day", "room_id"])
    op.create_index("usage_day_persona", "usage", ["day", "persona"])
    # Token-bucket state, so request limits survive a restart.
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),  # JSON of the bucket
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    # Chapter summaries: one per room (thread_root '' for the room itself).
    op.create_table(
        "summaries",
        sa.Column("room_id", sa.Text, primary_key=True),
        sa.Column("thread_root", sa.Text, primary_key=True, server_default=""),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("up_to_ts", sa.BigInteger, nullable=False),
        sa.Column("up_to_event_id", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    # Room mode: answer from the room's history or from the thread's.
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("mode", sa.Text, nullable=False, server_default="room"))
    # !rollback takes messages out of the context without deleting them.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("in_context", sa.Boolean, nullable=False, server_default=sa.true())
        )
    # A persona's reply to an event, persisted before the work starts (exactly once).
    op.create_table(
        "reply_jobs",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("persona", sa.Text, primary_key=True),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),  # pending | done | failed
        sa.Column("bounce_limit", sa.Integer, nullable=False),
        sa.Column("reply_event_id", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("reply_jobs_state", "reply_jobs", ["state"])


def downgrade() -> None:
    op.drop_index("reply_jobs_state", "reply_jobs")
    op.drop_table("reply_jobs")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("in_context")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("mode")
    op.drop_table("summaries")
    op.drop_table("rate_limits")
    op.drop_index("usage_day_persona", "usage")
    op.drop_index("usage_day_room", "usage")
    op.drop_index("usage_day_user", "usage")
    op.drop_table("usage")
    op.drop_table("endpoints")
    op.drop_table("aliases")
    op.drop_table("models")
