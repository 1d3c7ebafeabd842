"""The embedded SAE analysed into SQLite and PostgreSQL through ``saelab analyze``, then
read back with ``saelab features`` / ``feature``; re-runs replace, crashes keep the old."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.cli import app
from app.store import persist
from app.store.db import make_engine, session_factory
from app.store.explanations import NewExplanation, save_explanations
from app.store.models import Latent, LatentExamples

pytestmark = pytest.mark.slow
runner = CliRunner()


def _run(data_dir, *args):
    return runner.invoke(app, [str(a) for a in args], env={"SAELAB_DATA_DIR": str(data_dir)})


def _counts(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    with session_factory(engine)() as session:
        counts = (session.scalar(select(func.count()).select_from(Latent)),
                  session.scalar(select(func.coalesce(func.sum(LatentExamples.count), 0))))
    engine.dispose()
    return counts


def test_analyze_into_the_store_and_read_back(embedded_sae, data_dir, db_url, tmp_path,
                                              monkeypatch) -> None:
    sae = embedded_sae["sae"]
    result = _run(data_dir, "analyze", "--sae", sae, "--tokens", 4096, "--db", db_url)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["latents"] == 1024 and summary["tokens"] >= 4096
    latents, examples = _counts(db_url)
    assert latents == 1024 and examples > 1024

    listing = _run(data_dir, "features", summary["sae_id"], "--sort", "density", "--limit", 5,
                   "--json", "--db", db_url)
    rows = json.loads(listing.stdout)
    assert len(rows) == 5 and rows[0]["density"] >= rows[-1]["density"] > 0
    one = _run(data_dir, "feature", summary["sae_id"], rows[0]["index"], "--json",
               "--db", db_url)
    latent = json.loads(one.stdout)
    tops = [e for e in latent["examples"] if e["kind"] == "top"]
    assert len(tops) == 20
    assert max(tops[0]["activations"]) == pytest.approx(latent["max_activation"], rel=1e-3)
    assert all(isinstance(t, str) for t in tops[0]["tokens"])
    assert len(latent["top_logits"]) == 10 and len(latent["neighbours"]) == 10

    # A crash while writing the new analysis leaves the previous one in place.
    def crash(*_args, **_kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(persist, "insert_examples", crash)
    failed = _run(data_dir, "analyze", "--sae", sae, "--tokens", 2048, "--db", db_url)
    assert failed.exit_code == 2 and "disk gone" in failed.output
    assert _counts(db_url) == (latents, examples)
    monkeypatch.undo()

    # Explanations and steerability belong to the SAE's latents: a re-analysis keeps them.
    engine = make_engine(db_url)
    with session_factory(engine).begin() as session:
        kept = session.scalars(select(Latent).where(Latent.index == rows[0]["index"])).one()
        kept.steerability = 0.5
    save_explanations(session_factory(engine), [NewExplanation(
        kept.id, "a paid label", "claude-test", "key", detection=0.9, fuzzing=0.8,
        detection_n=20, fuzzing_n=20, usage={"cost_usd": 0.01})])
    engine.dispose()
    again = _run(data_dir, "analyze", "--sae", sae, "--tokens", 2048, "--db", db_url)
    assert again.exit_code == 0, again.output
    shown = json.loads(_run(data_dir, "feature", summary["sae_id"], rows[0]["index"],
                            "--json", "--db", db_url).stdout)
    assert shown["explanation"] == "a paid label" and shown["steerability"] == 0.5
    assert shown["explanations"][0]["detection_n"] == 20
    assert json.loads(again.stdout.strip().splitlines()[-1])["sae_id"] == summary["sae_id"]
    assert _counts(db_url)[0] == 1024  # replaced, not appended
    saes = json.loads(_run(data_dir, "saes", "--json", "--db", db_url).stdout)
    assert len(saes) == 1 and saes[0]["analysed_tokens"] >= 2048

    # Export, import under another path, export again: the same features.
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert _run(data_dir, "export", summary["sae_id"], "--out", first, "--db", db_url
                ).exit_code == 0
    imported = _run(data_dir, "import", first, "--path", "copy-of-l3", "--db", db_url)
    assert imported.exit_code == 0, imported.output
    copy_id = json.loads(imported.stdout)["sae_id"]
    assert copy_id != summary["sae_id"]
    assert _run(data_dir, "export", copy_id, "--out", second, "--db", db_url).exit_code == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["features"] == b["features"] and len(a["features"]) == 1024
    assert a["features"][0]["activations"][0]["values"]
    assert _run(data_dir, "export", copy_id, "--out", second, "--db", db_url).exit_code == 2


def test_bad_analyze_input(embedded_sae, data_dir, tmp_path, tiny_llama_dir) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    missing = _run(data_dir, "analyze", "--sae", tmp_path / "nope", "--db", url)
    assert missing.exit_code == 2 and "not an SAE folder" in missing.output
    mismatch = _run(data_dir, "analyze", "--sae", embedded_sae["sae"], "--model",
                    tiny_llama_dir, "--db", url)
    assert mismatch.exit_code == 2 and "was not trained on this model" in mismatch.output
    unreachable = _run(data_dir, "analyze", "--sae", embedded_sae["sae"], "--db",
                       "postgresql+psycopg://postgres@127.0.0.1:5999/x")
    assert unreachable.exit_code == 2 and "cannot reach the database" in unreachable.output
    assert _counts(url) == (0, 0)
    unknown = _run(data_dir, "feature", 7, 0, "--db", url)
    assert unknown.exit_code == 2 and "no SAE with id 7" in unknown.output
