"""The SQL store on SQLite and PostgreSQL: migrations from empty, a downgrade/upgrade round
trip, data surviving an upgrade, full-text search over explanations, cascades."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, insert, inspect, select

from app.store.db import (
    StoreError,
    current_revision,
    downgrade,
    make_engine,
    session_factory,
    upgrade,
)
from app.store.example_pack import StoredExample, pack_records
from app.store.models import Explanation, Job, Latent, LatentExamples, Sae
from app.store.queries import search_explanations

NOW = datetime(2026, 11, 1, tzinfo=UTC)
TABLES = {"models", "captures", "saes", "latents", "latent_examples", "explanations", "jobs"}
REPO = Path(__file__).resolve().parents[1]


def _fill(engine) -> int:
    """One model, SAE, three latents with examples and explanations, one job, written
    through the tables as they are at the current revision (reflected: the ORM models
    describe the newest schema)."""
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    with engine.begin() as conn:
        model_id = conn.execute(insert(t["models"]).values(
            name="smollm2-135m", d_model=576, n_layers=30, created_at=NOW)).inserted_primary_key[0]
        sae_id = conn.execute(insert(t["saes"]).values(
            model_id=model_id, name="L6", path="/saes/l6", architecture="topk", layer=6,
            d_in=576, n_latents=3, k=1, config={"k": 1}, metrics={"fvu": 0.2},
            created_at=NOW)).inserted_primary_key[0]
        texts = ["Python keywords like def and class", "closing parentheses in code", None]
        for index, text in enumerate(texts):
            latent_id = conn.execute(insert(t["latents"]).values(
                sae_id=sae_id, index=index, density=0.01 * (index + 1), mean_activation=1.0,
                max_activation=2.0 + index, histogram={"edges": [0, 1], "counts": [3]},
                top_logits=[["def", 1.5]], bottom_logits=[["the", -0.3]],
                neighbours=[[1, 0.4]], explanation=text)).inserted_primary_key[0]
            if "examples" in t:  # before 0007: one row per example
                conn.execute(insert(t["examples"]).values(
                    latent_id=latent_id, kind="top", rank=0, tokens=["a", "b"],
                    activations=[0.0, 2.0], context_index=4, position=9))
            else:
                conn.execute(insert(t["latent_examples"]).values(
                    latent_id=latent_id, count=1, data=pack_records([StoredExample(
                        "top", None, 0, ["a", "b"], [0.0, 2.0], 4, 9)])))
            if text:
                conn.execute(insert(t["explanations"]).values(
                    latent_id=latent_id, text=text, source="human", created_at=NOW))
        conn.execute(insert(t["jobs"]).values(kind="train", params={"k": 1}, state="queued",
                                              progress=0, series={"fvu": [0.5, 0.3]},
                                              created_at=NOW))
    return sae_id


def test_upgrade_from_empty_and_round_trip(db_url) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    assert current_revision(engine) == "0007"
    assert set(inspect(engine).get_table_names()) >= TABLES
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(engine)
    assert current_revision(engine) == "0007"
    engine.dispose()


def test_data_survives_the_upgrade_and_is_searchable(db_url) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    sae_id = _fill(engine)
    upgrade(engine)
    Session = session_factory(engine)
    with Session() as session:
        latents = session.scalars(select(Latent).order_by(Latent.index)).all()
        assert [lat.explanation for lat in latents][:2] == [
            "Python keywords like def and class", "closing parentheses in code"]
        assert latents[0].examples[0].activations == [0.0, 2.0]
        job = session.scalars(select(Job)).one()
        assert job.series == {"fvu": [0.5, 0.3]}
        assert (job.stats, job.result, job.attempts, job.cancel_requested) == ({}, {}, 0, False)
        explained = session.scalars(select(Explanation)).all()
        assert [(e.usage, e.detection_score, e.embedding) for e in explained] == [
            ({}, None, None)] * 2
        found = search_explanations(session, sae_id, "keywords")
        assert [lat.index for lat in found] == [0]  # rows written before 0002 are indexed
    with Session.begin() as session:
        latent = session.scalars(select(Latent).where(Latent.index == 2)).one()
        latent.explanation = "keywords of the standard library"
    with Session() as session:
        assert sorted(lat.index for lat in search_explanations(session, sae_id,
                                                               "keywords")) == [0, 2]
        assert search_explanations(session, sae_id, "parentheses code")[0].index == 1
        assert search_explanations(session, sae_id + 1, "keywords") == []
    with Session.begin() as session:
        session.delete(session.get(Sae, sae_id))
    with Session() as session:
        assert session.scalars(select(Latent)).all() == []
        assert session.scalars(select(LatentExamples)).all() == []
        assert session.scalars(select(Explanation)).all() == []
        assert search_explanations(session, sae_id, "keywords") == []
    engine.dispose()


def test_examples_are_packed_on_upgrade_and_unpacked_on_downgrade(db_url) -> None:
    """0007 packs each latent's example rows into one value and its downgrade restores the
    rows, in order, with awkward token texts intact."""
    engine = make_engine(db_url)
    upgrade(engine, "0006")
    _fill(engine)
    meta = MetaData()
    meta.reflect(engine)
    examples = meta.tables["examples"]
    with engine.begin() as conn:
        first = conn.scalar(select(meta.tables["latents"].c.id).where(
            meta.tables["latents"].c.index == 0))
        conn.execute(insert(examples).values(
            latent_id=first, kind="quantile", bucket=2, rank=1, tokens=["\x00", "é", "", "], ["],
            activations=[0.1234, -1.0, 3.5, 0.0], context_index=11, position=40))
    columns = [c for c in examples.c if c.name not in ("id", "latent_id")]

    def old_rows() -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(
                select(examples.c.latent_id, *columns).order_by(examples.c.latent_id,
                                                                  examples.c.id))]

    before = old_rows()
    upgrade(engine)
    with session_factory(engine)() as session:
        latent = session.scalars(select(Latent).where(Latent.index == 0)).one()
        assert [(e.kind, e.bucket, e.rank, e.tokens, e.activations, e.context_index,
                 e.position) for e in latent.examples] == [
            ("top", None, 0, ["a", "b"], [0.0, 2.0], 4, 9),
            ("quantile", 2, 1, ["\x00", "é", "", "], ["], [0.1234, -1.0, 3.5, 0.0], 11, 40)]
        assert session.scalar(select(LatentExamples.count).where(
            LatentExamples.latent_id == latent.id)) == 2
    downgrade(engine, "0006")
    meta = MetaData()
    meta.reflect(engine)
    examples = meta.tables["examples"]
    columns = [c for c in examples.c if c.name not in ("id", "latent_id")]
    assert "latent_examples" not in meta.tables
    assert old_rows() == before
    engine.dispose()


def test_alembic_command_line_upgrades_an_empty_database(db_url) -> None:
    env = {**os.environ, "SAELAB_DATABASE_URL": db_url}
    proc = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    engine = make_engine(db_url)
    assert current_revision(engine) == "0007"
    engine.dispose()


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="cannot reach the database .*5999"):
        make_engine("postgresql+psycopg://postgres@127.0.0.1:5999/none")
    with pytest.raises(StoreError, match="not a database URL"):
        make_engine("no such url")


def test_saelab_db_upgrade_and_downgrade(db_url) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade", "--db", db_url])
    assert result.exit_code == 0 and "revision 0007" in result.stdout, result.output
    result = runner.invoke(app, ["db", "downgrade", "--to", "0001", "--db", db_url])
    assert result.exit_code == 0 and "revision 0001" in result.stdout, result.output
    result = runner.invoke(app, ["db", "upgrade", "--db", "sqlite:////proc/no/such/dir.db"])
    assert result.exit_code == 2 and result.output.count("error:") == 1


def test_concurrent_upgrades_of_a_fresh_database_are_safe(db_url) -> None:
    """Six processes migrating one empty database at once (workers, the web and the CLI
    starting together) all succeed and leave it at the newest revision."""
    env = {**os.environ, "SAELAB_DATABASE_URL": db_url}
    procs = [subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()",
                               "db", "upgrade"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), [err[-500:] for _, err in outcomes]
    engine = make_engine(db_url)
    assert current_revision(engine) == "0007"
    engine.dispose()


def test_a_new_maxact_version_supersedes_the_old_one_and_keeps_other_labels(db_url) -> None:
    """On both databases: saving maxact-3 labels deletes the latents' maxact-1 labels (and
    a latent that showed one shows its best remaining label), never a human one, and only
    on the latents it labels; the prefix match is literal (``maxact_`` is not ``maxact-``)."""
    from app.store.explanations import NewExplanation, save_explanations

    engine = make_engine(db_url)
    upgrade(engine)
    _fill(engine)
    sessions = session_factory(engine)
    with sessions() as session:
        first, second, third = (lat.id for lat in session.scalars(
            select(Latent).order_by(Latent.index)))
    old = {"detection": 0.99, "fuzzing": 0.99, "detection_n": 4, "fuzzing_n": 4}
    save_explanations(sessions, [NewExplanation(first, "old a", "maxact-1", "k", **old),
                                 NewExplanation(third, "old c", "maxact-1", "k", **old),
                                 NewExplanation(third, "kept", "maxact_x", "k", **old)])
    save_explanations(sessions, [NewExplanation(first, "new a", "maxact-3", "k3",
                                                detection=0.7, fuzzing=0.7),
                                 NewExplanation(second, "new b", "maxact-3", "k3",
                                                detection=0.6, fuzzing=0.6)],
                      supersede="maxact-")
    with sessions() as session:
        sources = {(e.latent_id, e.source) for e in session.scalars(select(Explanation))}
        shown = {lat.id: lat.explanation for lat in session.scalars(select(Latent))}
    assert (first, "maxact-1") not in sources and (first, "human") in sources
    assert (third, "maxact-1") in sources  # not relabelled: left alone
    assert (third, "maxact_x") in sources
    assert shown[first] == "new a" and shown[second] == "new b"
    engine.dispose()
