"""explanation scores and settings: detection and fuzzing balanced accuracy, the
explainer settings key (re-runs skip latents explained the same way), usage, and an
embedding of the text for semantic search

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 22:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column]:
    return [
        sa.Column("detection_score", sa.Float(), nullable=True),
        sa.Column("fuzzing_score", sa.Float(), nullable=True),
        sa.Column("settings_key", sa.String(64), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=False, server_default="{}"),
        sa.Column("embedding", sa.JSON(), nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("explanations") as batch:
        for column in _columns():
            batch.add_column(column)
    op.create_index("ix_explanations_settings", "explanations", ["latent_id", "settings_key"])


def downgrade() -> None:
    op.drop_index("ix_explanations_settings", table_name="explanations")
    with op.batch_alter_table("explanations") as batch:
        for column in reversed(_columns()):
            batch.drop_column(column.name)
