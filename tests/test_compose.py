"""docker-compose.yml: the services, their commands and order, checked without Docker
(``docker compose config`` is not available everywhere CI runs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_services_and_commands() -> None:
    services = _services()
    assert {"redis", "postgres", "migrate", "web", "worker"} <= set(services)
    assert services["web"]["command"][:2] == ["saelab", "serve"]
    assert services["web"]["ports"] == ["8000:8000"]
    assert services["web"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    assert services["migrate"]["command"] == ["saelab", "db", "upgrade"]
    assert services["worker"]["command"][:2] == ["saelab", "worker"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully")
    env = services["worker"]["environment"]
    assert env["SAELAB_BROKER_URL"].startswith("redis://redis:")
    assert env["SAELAB_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "artifacts:/data" in services["worker"]["volumes"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_commands_exist() -> None:
    """Every saelab command the compose file runs is a real command of this CLI."""
    from typer.testing import CliRunner

    from app.cli import app

    for service in _services().values():
        command = service.get("command")
        if command and command[0] == "saelab":
            result = CliRunner().invoke(app, [*command[1:], "--help"])
            assert result.exit_code == 0, (command, result.output)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config() -> None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker has no compose plugin here")
    proc = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_published_explorer_requires_an_admin_token() -> None:
    """Compose refuses to start the web service without SAELAB_ADMIN_TOKEN (``${VAR:?}``)."""
    env = _services()["web"]["environment"]
    assert env["SAELAB_ADMIN_TOKEN"].startswith("${SAELAB_ADMIN_TOKEN:?")
    assert "SAELAB_ALLOWED_HOSTS" in env
