"""``saelab serve``: the explorer under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import DbOpt, app, cli_errors
from app.settings import get_settings


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="[default: settings, "
                                             "127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option("--port", help="[default: settings, 8000]")] = None,
    db: DbOpt = None,
) -> None:
    """Serve the explorer (pages, JSON API at /api/v1, OpenAPI docs at /docs)."""
    import uvicorn

    from app.web.main import create_app

    settings = get_settings()
    if db:
        settings.database_url = db
    with cli_errors():
        web = create_app(settings)
    host, port = host or settings.host, port or settings.port
    typer.echo(f"saelab explorer on http://{host}:{port}/")
    uvicorn.run(web, host=host, port=port, log_level="info")
