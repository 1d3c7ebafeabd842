"""The bulk example writer (one executemany on SQLite, a binary COPY on PostgreSQL) packs
each latent's examples so that they read back exactly as the analysis chose them: trimmed
token texts, activations rounded to 4 decimals, awkward token texts (quotes, backslashes,
tabs, newlines, NUL, "], [") intact, over several batches."""

from __future__ import annotations

import torch
from sqlalchemy import select

from app.store.bulk import BATCH, pack_rows
from app.store.db import make_engine, session_factory, upgrade
from app.store.models import Latent, LatentExamples, Model, Sae
from app.store.persist import insert_examples
from training.analysis.examples import ExampleSet

ODD = ['"', "\\", "\t", "\n", "], [", "é", "\u0000x", "", " x", "\ud83d"]
PER_LATENT = 4


def _examples(rows: int) -> ExampleSet:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(ODD), (rows, 7), generator=g)
    tokens[::3, :2] = -1  # windows at the start of a context
    tokens[1::3, -1] = -1  # and at its end
    acts = torch.rand(rows, 7, generator=g) * 3
    acts[tokens < 0] = 0
    latent = torch.arange(rows) // PER_LATENT
    bucket = torch.where(torch.arange(rows) % 4 < 2, -1, torch.arange(rows) % 2)
    return ExampleSet(latent=latent, bucket=bucket, rank=torch.arange(rows) % 2,
                      context=torch.arange(rows), position=torch.full((rows,), 3),
                      tokens=tokens, activations=acts)


def test_packed_examples_read_back_as_the_analysis_chose_them(db_url) -> None:
    n_latents = BATCH + 37  # two batches, three packing chunks
    examples = _examples(n_latents * PER_LATENT)
    engine = make_engine(db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        sae = Sae(path="/x", name="x", architecture="topk", layer=0, d_in=7,
                  n_latents=n_latents, model=Model(name="m", d_model=7, n_layers=1))
        session.add(sae)
        session.flush()
        latents = [Latent(sae_id=sae.id, index=i, density=0.1, mean_activation=1.0,
                          max_activation=3.0) for i in range(n_latents + 1)]
        session.add_all(latents)
        session.flush()
        ids = [latent.id for latent in latents]
        assert insert_examples(session, ids, examples, dict(enumerate(ODD))) == len(examples)
    with sessions() as session:
        stored = {lat.index: lat.examples for lat in session.scalars(select(Latent))}
        counts = dict(session.execute(select(LatentExamples.latent_id,
                                            LatentExamples.count)).all())
    engine.dispose()
    assert stored[n_latents] == [] and ids[n_latents] not in counts  # no examples, no row
    assert set(counts.values()) == {PER_LATENT}
    expected: dict[int, list] = {}
    for f, want in examples.records():
        expected.setdefault(f, []).append(want)
    for f, wants in expected.items():
        assert len(stored[f]) == len(wants)
        for got, want in zip(stored[f], wants, strict=True):
            assert (got.kind, got.bucket, got.rank) == (want.kind, want.bucket, want.rank)
            assert got.tokens == [ODD[t] for t in want.tokens]
            assert got.activations == [round(a, 4) for a in want.activations]
            assert (got.context_index, got.position) == (want.context_index, want.position)


def test_rows_are_batched_and_empty_sets_write_nothing() -> None:
    assert list(pack_rows([5], _examples(0), {})) == []
    one = list(pack_rows(list(range(10)), _examples(8), dict(enumerate(ODD))))
    assert [[(latent_id, count) for latent_id, count, _ in batch] for batch in one] == [
        [(0, 4), (1, 4)]]
