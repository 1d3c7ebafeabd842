"""``saelab serve``: the explorer under uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli.common import DbOpt, app, cli_errors
from app.settings import get_settings


def check_bind(host: str, settings) -> None:
    """Refuse to serve beyond this machine without an admin token: anyone who can reach
    the port could queue jobs and read what the lab holds."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not settings.admin_token:
        raise ValueError(f"--host {host} is reachable from other machines: set "
                         "SAELAB_ADMIN_TOKEN (e.g. export SAELAB_ADMIN_TOKEN=$(openssl rand "
                         "-hex 24)) and list the names clients use in SAELAB_ALLOWED_HOSTS, "
                         "or serve on 127.0.0.1")


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
    host, port = host or settings.host, port or settings.port
    with cli_errors():
        check_bind(host, settings)
        web = create_app(settings)
    typer.echo(f"saelab explorer on http://{host}:{port}/")
    uvicorn.run(web, host=host, port=port, log_level="info")
