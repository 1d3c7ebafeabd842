"""The bulk example writer (one executemany on SQLite, COPY on PostgreSQL) stores exactly
what the SQLAlchemy JSON columns would: trimmed token texts, activations rounded to 4
decimals, awkward token texts (quotes, backslashes, tabs, newlines, "], [") intact."""

from __future__ import annotations

import torch
from sqlalchemy import select

from app.store.bulk import CHUNK, example_rows
from app.store.db import make_engine, session_factory, upgrade
from app.store.models import Example, Latent, Model, Sae
from app.store.persist import insert_examples
from training.analysis.examples import ExampleSet

ODD = ['"', "\\", "\t", "\n", "], [", "é", "\u0000x", "", " x"]


def _examples(rows: int) -> ExampleSet:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(ODD), (rows, 7), generator=g)
    tokens[::3, :2] = -1  # windows at the start of a context
    tokens[1::3, -1] = -1  # and at its end
    acts = torch.rand(rows, 7, generator=g) * 3
    acts[tokens < 0] = 0
    latent = torch.arange(rows) // 4
    bucket = torch.where(torch.arange(rows) % 4 < 2, -1, torch.arange(rows) % 2)
    return ExampleSet(latent=latent, bucket=bucket, rank=torch.arange(rows) % 2,
                      context=torch.arange(rows), position=torch.full((rows,), 3),
                      tokens=tokens, activations=acts)


def test_bulk_rows_are_what_the_readers_expect(db_url) -> None:
    rows = CHUNK + 37  # two chunks
    examples = _examples(rows)
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sae = Sae(path="/x", name="x", architecture="topk", layer=0, d_in=7, n_latents=1,
                  model=Model(name="m", d_model=7, n_layers=1))
        session.add(sae)
        session.flush()
        latents = [Latent(sae_id=sae.id, index=i, density=0.1, mean_activation=1.0,
                          max_activation=3.0) for i in range(rows // 4 + 1)]
        session.add_all(latents)
        session.flush()
        ids = [latent.id for latent in latents]
        assert insert_examples(session, ids, examples, dict(enumerate(ODD))) == rows
    with sessions() as session:
        stored = session.scalars(select(Example).order_by(Example.id)).all()
    engine.dispose()
    assert len(stored) == rows
    for (f, want), got in zip(examples.records(), stored, strict=True):
        assert got.latent_id == ids[f] and (got.kind, got.bucket, got.rank) == (
            want.kind, want.bucket, want.rank)
        assert got.tokens == [ODD[t] for t in want.tokens]
        assert got.activations == [round(a, 4) for a in want.activations]
        assert (got.context_index, got.position) == (want.context_index, want.position)


def test_rows_are_chunked_and_empty_sets_write_nothing() -> None:
    chunks = list(example_rows([5], _examples(0), {}))
    assert chunks == []
    one = list(example_rows(list(range(10)), _examples(8), dict(enumerate(ODD))))
    assert [len(chunk) for chunk in one] == [8]
