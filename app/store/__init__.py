"""The SQL store: SQLAlchemy models, engine/session setup and Alembic migrations."""
