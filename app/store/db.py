"""Engines, sessions and migrations for the store.

SQLite (the embedded default) runs in WAL mode with foreign keys enforced, so readers
never block the writer and ON DELETE CASCADE works as on PostgreSQL. The schema is only
ever created by Alembic (``migrations/``), never by ``create_all``, so every database has
a recorded revision and can be upgraded in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


SQLITE_BUSY_TIMEOUT_MS = 120_000
"""How long a SQLite writer waits for the file's write lock before failing."""


class StoreError(ValueError):
    """A database that cannot be used (bad URL, unreachable server); the message says which."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``; checks that the database answers."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"--db {url!r} is not a database URL: {exc}") from exc
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # a server connection can drop while pooled (pre-ping checks it); a SQLite file cannot
    sqlite = parsed.drivername.startswith("sqlite")
    engine = create_engine(parsed, pool_pre_ping=not sqlite)
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        raise StoreError(f"cannot reach the database {parsed.render_as_string()}: "
                         f"{str(exc.orig).strip().splitlines()[0]}") from exc
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # writers wait for each other (a whole analysis is persisted in one transaction)
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def open_store(url: str) -> sessionmaker[Session]:
    """Sessions on the store at ``url``, migrated to the newest revision first."""
    engine = make_engine(url)
    upgrade(engine)
    return session_factory(engine)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate to ``revision``; processes starting together (workers, the web, the CLI)
    take turns, so a fresh database is created once."""
    with migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with migration_lock(engine):
        command.downgrade(alembic_config(engine), revision)


MIGRATION_LOCK_KEY = 0x5AE1AB
"""The PostgreSQL advisory lock held while migrating."""


@contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process at a time: a PostgreSQL advisory lock, or an exclusive file
    lock beside a SQLite database."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"),
                             {"key": MIGRATION_LOCK_KEY})
        return
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        import fcntl

        lock_path = Path(url.database).expanduser().with_suffix(".migrate.lock")
        with lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    yield


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
