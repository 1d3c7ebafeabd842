"""The ``saelab import-sae`` flow the import tests share: a folder imported and analysed on
a small corpus into a fresh SQLite store, then the store's SAEs listed."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()


def import_and_list(folder: Path, tmp_path: Path) -> tuple[dict[str, str], list[dict]]:
    """(the env the commands ran with, ``saelab saes --json``) after ``saelab import-sae
    folder --now`` on 2,048 tokens of a repeated sentence, which must succeed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"),
           "SAELAB_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    result = runner.invoke(app, ["import-sae", str(folder), "--dataset", str(corpus),
                                 "--tokens", "2048", "--now", "--json"], env=env)
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout.strip().splitlines()[-1])
    assert job["state"] == "succeeded", job["message"]
    return env, json.loads(runner.invoke(app, ["saes", "--json"], env=env).stdout)
