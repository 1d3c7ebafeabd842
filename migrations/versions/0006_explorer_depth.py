"""the explorer's depth: steering presets, named lists of latents with notes, and per
latent its co-firing latents and feature-map position

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _latent_columns() -> list[sa.Column]:
    return [sa.Column("cofiring", sa.JSON(), nullable=True),
            sa.Column("map_x", sa.Float(), nullable=True),
            sa.Column("map_y", sa.Float(), nullable=True)]


def upgrade() -> None:
    op.create_table(
        "steer_presets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("sae_id", sa.Integer(), sa.ForeignKey("saes.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("latents", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    op.create_table(
        "latent_lists",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    op.create_table(
        "list_items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("list_id", sa.Integer(), sa.ForeignKey("latent_lists.id",
                                                         ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("sae_id", sa.Integer(), sa.ForeignKey("saes.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("latent_index", sa.Integer(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("list_id", "sae_id", "latent_index", name="uq_list_item"))
    # plain ADD COLUMN: a batch rebuild of latents would drop its full-text triggers
    for column in _latent_columns():
        op.add_column("latents", column)


def downgrade() -> None:
    for column in reversed(_latent_columns()):
        op.drop_column("latents", column.name)
    op.drop_table("list_items")
    op.drop_table("latent_lists")
    op.drop_table("steer_presets")
