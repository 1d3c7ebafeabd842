"""each latent's examples as one packed row (latent_examples) instead of one JSON row per
window (examples); existing examples are packed in place, and unpacked again on downgrade

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 08:00:00
"""

from __future__ import annotations

from itertools import groupby
from types import SimpleNamespace

import sqlalchemy as sa
from alembic import op

from app.store.example_pack import ExamplePack, pack_records

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BATCH = 500
"""Latents packed (or unpacked) per insert."""

_OLD = sa.table(
    "examples", sa.column("id", sa.Integer()), sa.column("latent_id", sa.Integer()),
    sa.column("kind", sa.String()), sa.column("bucket", sa.Integer()),
    sa.column("rank", sa.Integer()), sa.column("tokens", sa.JSON()),
    sa.column("activations", sa.JSON()), sa.column("context_index", sa.Integer()),
    sa.column("position", sa.Integer()))
_NEW = sa.table("latent_examples", sa.column("latent_id", sa.Integer()),
                sa.column("count", sa.Integer()), sa.column("data", sa.LargeBinary()))


def upgrade() -> None:
    op.create_table(
        "latent_examples",
        sa.Column("latent_id", sa.Integer(), sa.ForeignKey("latents.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False))
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":  # mostly float32s: compressing them costs more
        op.execute("ALTER TABLE latent_examples ALTER COLUMN data SET STORAGE EXTERNAL")
    latent_ids = list(bind.scalars(sa.select(_OLD.c.latent_id).distinct()
                                   .order_by(_OLD.c.latent_id)))
    for first in range(0, len(latent_ids), BATCH):  # a batch of latents in memory at once
        wanted = latent_ids[first:first + BATCH]
        rows = bind.execute(sa.select(_OLD).where(_OLD.c.latent_id.in_(wanted))
                            .order_by(_OLD.c.latent_id, _OLD.c.id)).mappings().all()
        packs = []
        for latent_id, examples in groupby(rows, key=lambda row: row["latent_id"]):
            records = [SimpleNamespace(**row) for row in examples]
            packs.append({"latent_id": latent_id, "count": len(records),
                          "data": pack_records(records)})
        bind.execute(sa.insert(_NEW), packs)
    with op.batch_alter_table("examples") as batch_op:
        batch_op.drop_index("ix_examples_latent_id")
    op.drop_table("examples")


def downgrade() -> None:
    op.create_table(
        "examples",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("latent_id", sa.Integer(), sa.ForeignKey("latents.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.JSON(), nullable=False),
        sa.Column("activations", sa.JSON(), nullable=False),
        sa.Column("context_index", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False))
    op.create_index("ix_examples_latent_id", "examples", ["latent_id"])
    bind = op.get_bind()
    latent_ids = list(bind.scalars(sa.select(_NEW.c.latent_id).order_by(_NEW.c.latent_id)))
    for first in range(0, len(latent_ids), BATCH):
        packs = bind.execute(sa.select(_NEW.c.latent_id, _NEW.c.data).where(
            _NEW.c.latent_id.in_(latent_ids[first:first + BATCH]))
            .order_by(_NEW.c.latent_id)).all()
        rows = [{"latent_id": latent_id, "kind": ex.kind, "bucket": ex.bucket,
                 "rank": ex.rank, "tokens": ex.tokens, "activations": ex.activations,
                 "context_index": ex.context_index, "position": ex.position}
                for latent_id, data in packs for ex in ExamplePack(data).examples()]
        if rows:
            bind.execute(sa.insert(_OLD), rows)
    op.drop_table("latent_examples")
