"""``saelab db``: apply and inspect the store's migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import DbOpt, app, cli_errors
from app.settings import get_settings

db_app = typer.Typer(help="The SQL store: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _engine(db: str | None):
    from app.store.db import make_engine

    return make_engine(db or get_settings().database_url)


@db_app.command("upgrade")
def upgrade(db: DbOpt = None,
            revision: Annotated[str, typer.Option("--to", help="target revision")] = "head"
            ) -> None:
    """Apply migrations up to --to (default: the newest)."""
    from app.store.db import current_revision
    from app.store.db import upgrade as run_upgrade

    with cli_errors():
        engine = _engine(db)
        run_upgrade(engine, revision)
        typer.echo(f"database at revision {current_revision(engine)}")


@db_app.command("downgrade")
def downgrade(revision: Annotated[str, typer.Option("--to", help="target revision "
                                                    "('base' empties the database)")],
              db: DbOpt = None) -> None:
    """Undo migrations down to --to."""
    from app.store.db import current_revision
    from app.store.db import downgrade as run_downgrade

    with cli_errors():
        engine = _engine(db)
        run_downgrade(engine, revision)
        typer.echo(f"database at revision {current_revision(engine)}")
