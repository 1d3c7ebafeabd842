"""Neuronpedia-style export and import of an SAE's features, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.cli import app
from app.store.db import make_engine, session_factory, upgrade
from app.store.exchange import ExchangeError, export_sae, import_sae
from app.store.models import Explanation, Latent, Sae
from tests.test_store import _fill


@pytest.fixture
def filled(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    sae_id = _fill(engine)
    yield session_factory(engine), sae_id
    engine.dispose()


def test_round_trip_keeps_everything(filled) -> None:
    sessions, sae_id = filled
    with sessions() as session:
        data = export_sae(session, sae_id)
    feature = data["features"][0]
    assert data["modelId"] == "smollm2-135m" and data["layer"] == 6
    assert feature["pos_str"] == ["def"] and feature["neg_values"] == [-0.3]
    assert feature["activations"][0]["maxValue"] == 2.0
    assert feature["activations"][0]["maxValueTokenIndex"] == 1
    assert feature["explanations"][0]["description"] == "Python keywords like def and class"
    text = json.dumps(data)  # plain JSON all the way down

    copy_id = import_sae(sessions, json.loads(text), path="/saes/copy")
    with sessions() as session:
        again = export_sae(session, copy_id)
        assert again["features"] == data["features"]
        assert again["sae"]["metrics"] == {"fvu": 0.2}
        latent = session.scalars(select(Latent).where(Latent.sae_id == copy_id,
                                                      Latent.index == 1)).one()
        assert latent.explanation == "closing parentheses in code"
    # importing again replaces, never duplicates
    assert import_sae(sessions, json.loads(text), path="/saes/copy") == copy_id
    with sessions() as session:
        count = session.scalar(select(func.count()).select_from(Latent)
                               .where(Latent.sae_id == copy_id))
        assert count == 3
        assert session.scalar(select(func.count()).select_from(Explanation)) == 4


def _broken(data: dict) -> list[tuple[dict, str]]:
    cases = []
    for mutate, message in [
        (lambda d: d.update(format="other"), "not a feature export"),
        (lambda d: d.update(version=9), "version 9 is not supported"),
        (lambda d: d["sae"].pop("d_in"), "lacks \"d_in\""),
        (lambda d: d["features"][1].update(index=0), "repeats a feature index"),
        (lambda d: d["features"][1].update(index=99), "integer \"index\""),
        (lambda d: d["features"][2]["activations"][0]["values"].append(1.0),
         "2 tokens but 3 values"),
    ]:
        bad = copy.deepcopy(data)
        mutate(bad)
        cases.append((bad, message))
    return cases


def test_bad_imports_write_nothing(filled) -> None:
    sessions, sae_id = filled
    with sessions() as session:
        data = export_sae(session, sae_id)
    for bad, message in _broken(data):
        with pytest.raises(ExchangeError, match=message):
            import_sae(sessions, bad, path="/saes/bad")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Sae)) == 1
        assert session.scalar(select(func.count()).select_from(Latent)) == 3


def test_cli_export_import_errors(tmp_path) -> None:
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    missing = runner.invoke(app, ["export", "3", "--out", str(tmp_path / "x.json"),
                                  "--db", url])
    assert missing.exit_code == 2 and "no SAE with id 3" in missing.output
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "junk.json").write_text("{not json")
    junk = runner.invoke(app, ["import", str(tmp_path / "junk.json"), "--db", url])
    assert junk.exit_code == 2 and "is not JSON" in junk.output
    absent = runner.invoke(app, ["import", str(tmp_path / "none.json"), "--db", url])
    assert absent.exit_code == 2 and "cannot read" in absent.output
