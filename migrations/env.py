"""Alembic environment: the engine comes from ``app.store.db`` (``saelab db upgrade``) or,
for a plain ``alembic upgrade head``, from saelab's settings (``SAELAB_DATABASE_URL``)."""

from __future__ import annotations

from alembic import context

from app.store.models import Base

config = context.config


def _engine():
    engine = config.attributes.get("engine")
    if engine is None:
        from app.settings import get_settings
        from app.store.db import make_engine

        engine = make_engine(get_settings().database_url)
    return engine


def run_migrations_online() -> None:
    with _engine().connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
