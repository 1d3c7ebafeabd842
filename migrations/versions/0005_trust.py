"""what makes a latent's figures trustworthy: sink flags, steerability from steer-eval,
the SAE's dead share over its analysed tokens, and each explanation score's sample size
and simulation score

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _latent_columns() -> list[sa.Column]:
    return [
        sa.Column("sink", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("sink_reason", sa.Text(), nullable=True),
        sa.Column("steerability", sa.Float(), nullable=True),
        sa.Column("steer_eval", sa.JSON(), nullable=True),
    ]


def _explanation_columns() -> list[sa.Column]:
    return [
        sa.Column("simulation_score", sa.Float(), nullable=True),
        sa.Column("detection_n", sa.Integer(), nullable=True),
        sa.Column("fuzzing_n", sa.Integer(), nullable=True),
        sa.Column("simulation_n", sa.Integer(), nullable=True),
    ]


def upgrade() -> None:
    # plain ADD COLUMN, never a batch rebuild of latents: that would drop the full-text
    # search triggers of migration 0002
    for column in _latent_columns():
        op.add_column("latents", column)
    op.create_index("ix_latents_sae_steerability", "latents", ["sae_id", "steerability"])
    with op.batch_alter_table("explanations") as batch:
        for column in _explanation_columns():
            batch.add_column(column)
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("dead_share", sa.Float(), nullable=True))
    # the dead share of SAEs analysed before: latents that never fired over the analysed tokens
    op.execute("UPDATE saes SET dead_share = (SELECT CAST(SUM(CASE WHEN latents.density = 0 "
               "THEN 1 ELSE 0 END) AS FLOAT) / COUNT(*) FROM latents WHERE latents.sae_id = "
               "saes.id) WHERE EXISTS (SELECT 1 FROM latents WHERE latents.sae_id = saes.id)")


def downgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("dead_share")
    with op.batch_alter_table("explanations") as batch:
        for column in reversed(_explanation_columns()):
            batch.drop_column(column.name)
    op.drop_index("ix_latents_sae_steerability", table_name="latents")
    # native DROP COLUMN (SQLite >= 3.35), for the same reason
    for column in reversed(_latent_columns()):
        op.drop_column("latents", column.name)
