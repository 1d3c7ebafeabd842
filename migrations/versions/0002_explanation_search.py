"""full-text search over latent explanations

SQLite: an external-content FTS5 table over ``latents.explanation`` kept in step by
triggers. PostgreSQL: a GIN index on the English tsvector of the explanation. Existing
rows are indexed by the upgrade.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 20:10:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SQLITE_UP = [
    "CREATE VIRTUAL TABLE latents_fts USING fts5(explanation, content='latents', "
    "content_rowid='id')",
    "CREATE TRIGGER latents_fts_insert AFTER INSERT ON latents BEGIN "
    "INSERT INTO latents_fts(rowid, explanation) VALUES (new.id, new.explanation); END",
    "CREATE TRIGGER latents_fts_delete AFTER DELETE ON latents BEGIN "
    "INSERT INTO latents_fts(latents_fts, rowid, explanation) "
    "VALUES ('delete', old.id, old.explanation); END",
    "CREATE TRIGGER latents_fts_update AFTER UPDATE OF explanation ON latents BEGIN "
    "INSERT INTO latents_fts(latents_fts, rowid, explanation) "
    "VALUES ('delete', old.id, old.explanation); "
    "INSERT INTO latents_fts(rowid, explanation) VALUES (new.id, new.explanation); END",
    "INSERT INTO latents_fts(latents_fts) VALUES ('rebuild')",
]
SQLITE_DOWN = [
    "DROP TRIGGER latents_fts_update",
    "DROP TRIGGER latents_fts_delete",
    "DROP TRIGGER latents_fts_insert",
    "DROP TABLE latents_fts",
]
POSTGRES_UP = [
    "CREATE INDEX ix_latents_explanation_fts ON latents "
    "USING gin (to_tsvector('english', coalesce(explanation, '')))",
]
POSTGRES_DOWN = ["DROP INDEX ix_latents_explanation_fts"]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _run(SQLITE_UP if dialect == "sqlite" else POSTGRES_UP if dialect == "postgresql" else [])


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _run(SQLITE_DOWN if dialect == "sqlite" else POSTGRES_DOWN if dialect == "postgresql"
         else [])
