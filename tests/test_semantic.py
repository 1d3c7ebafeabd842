"""Sentence embeddings of explanations and semantic / combined search over them, with the
real all-MiniLM-L6-v2 model, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from app.store.db import open_store
from app.store.models import Explanation, Latent, Model, Sae
from app.store.queries import search_explanations
from app.store.semantic import combined_hits, combined_search, embed_missing, semantic_search
from training.autointerp.embeddings import (
    TextEmbedder,
    embedder_dir,
    mean_pool,
    native_bf16,
    text_embedder,
)

EXPLANATIONS = ["python keywords like def", "closing brackets", "names of cities in Europe",
                "numbers written as digits", "the word 'the' before nouns",
                "negative sentiment in reviews"]


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return text_embedder()


def _sae(session, model: Model, path: str, texts: list[str]) -> Sae:
    sae = Sae(model=model, name=path, path=path, architecture="topk", layer=3, d_in=8,
              n_latents=len(texts), k=1)
    for index, text in enumerate(texts):
        latent = Latent(sae=sae, index=index, density=0.01, mean_activation=1.0,
                        max_activation=2.0, explanation=text)
        session.add(latent)
        session.flush()
        session.add(Explanation(latent_id=latent.id, text=text, source="human", score=0.7))
    return sae


@pytest.fixture
def store(db_url):
    """Sessions on a store with two SAEs explained alike: {"sessions", "sae", "other"}."""
    sessions = open_store(db_url)
    with sessions.begin() as session:
        model = Model(name="m", d_model=8, n_layers=4)
        sae = _sae(session, model, "/saes/a", EXPLANATIONS)
        other = _sae(session, model, "/saes/b", EXPLANATIONS[:3])
        session.flush()
        ids = {"sae": sae.id, "other": other.id}
    yield {"sessions": sessions, **ids}
    sessions.kw["bind"].dispose()


def test_embeddings_are_unit_vectors_of_their_meaning(embedder) -> None:
    texts = ["names of cities in Europe", "town in france", "closing brackets",
             "names of cities in Europe"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (4, embedder.dim) == (4, 384) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))
    cosine = vectors @ vectors.T
    assert cosine[0, 3] == pytest.approx(1.0, abs=1e-5)
    assert cosine[0, 1] > cosine[0, 2] + 0.2
    assert cosine[1, 0] > cosine[1, 2] + 0.2
    assert embedder.embed([]).shape == (0, 384)


@pytest.fixture(scope="module")
def float32_embedder() -> TextEmbedder:
    return TextEmbedder(embedder_dir(), dtype=torch.float32)


def test_batching_and_padding_do_not_change_an_embedding(float32_embedder) -> None:
    texts = ["a", "closing brackets in a long line of nested code " * 8, "town in france"]
    together = float32_embedder.embed(texts, batch=3)
    alone = torch.cat([float32_embedder.embed([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_bfloat16_embeddings_point_where_float32_ones_do(float32_embedder) -> None:
    """The embedder runs in bf16 where the CPU does bf16 matmuls; its vectors must stay
    interchangeable with float32 ones (stored embeddings and queries may come from either)."""
    bf16 = TextEmbedder(embedder_dir(), dtype=torch.bfloat16)
    texts = [*EXPLANATIONS, "def, class at line start; promotes __init__ (",
             "closing brackets in a long line of nested code " * 8]
    a, b = float32_embedder.embed(texts, batch=4), bf16.embed(texts, batch=4)
    assert b.dtype == torch.float32
    assert (a * b).sum(1).min() > 0.99
    expected = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    assert text_embedder().dtype == expected
    assert not native_bf16(torch.device("meta"))


def test_a_repeated_text_is_embedded_once(embedder, monkeypatch) -> None:
    seen: list[str] = []
    real = embedder._embed_batch

    def counting(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return real(texts)

    monkeypatch.setattr(embedder, "_embed_batch", counting)
    texts = ["town in france", "closing brackets", "town in france", "town in france"]
    vectors = embedder.embed(texts, batch=1)
    assert sorted(seen) == ["closing brackets", "town in france"]
    torch.testing.assert_close(vectors[0], vectors[3])
    torch.testing.assert_close(vectors[1], embedder.embed(["closing brackets"])[0])


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[3.0, 0.0], [3.0, 8.0], [100.0, 100.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.tensor([[0.6, 0.8]]))


def test_embed_missing_fills_each_explanation_once(store, embedder) -> None:
    sessions = store["sessions"]
    with sessions.begin() as session:  # an explicit None is stored as JSON null
        latent = session.scalars(select(Latent).where(Latent.sae_id == store["sae"],
                                                      Latent.index == 0)).one()
        session.add(Explanation(latent_id=latent.id, text="def and class", source="human",
                                embedding=None))
    assert embed_missing(sessions, store["sae"], embedder, batch=4) == len(EXPLANATIONS) + 1
    assert embed_missing(sessions, store["sae"], embedder) == 0
    with sessions() as session:
        rows = session.execute(select(Explanation.text, Explanation.embedding, Latent.sae_id)
                               .join(Latent)).all()
    vectors = {text: vec for text, vec, sae_id in rows if sae_id == store["sae"]}
    assert all(vec is None for _, vec, sae_id in rows if sae_id == store["other"])
    assert len(vectors) == len(EXPLANATIONS) + 1
    expected = embedder.embed(["def and class"])[0]
    torch.testing.assert_close(torch.tensor(vectors["def and class"]), expected, atol=1e-5,
                               rtol=0)


def test_a_query_with_no_word_in_common_finds_the_meaning(store, embedder) -> None:
    embed_missing(store["sessions"], store["sae"], embedder)
    with store["sessions"]() as session:
        assert search_explanations(session, store["sae"], "town in france") == []
        hits = semantic_search(session, store["sae"], embedder.embed(["town in france"])[0], 3)
        assert hits[0][0].explanation == "names of cities in Europe"
        assert all(lat.sae_id == store["sae"] for lat, _ in hits)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        query = embedder.embed(["programming language syntax"])[0].tolist()
        assert semantic_search(session, store["sae"], query, 1)[0][0].index == 0
        # the other SAE's explanations are not embedded yet: nothing to find there
        assert semantic_search(session, store["other"], query, 5) == []
        with pytest.raises(ValueError, match="dimensions"):
            semantic_search(session, store["sae"], [1.0, 0.0], 3)


def test_the_best_explanation_of_a_latent_is_searched(store, embedder) -> None:
    sessions = store["sessions"]
    embed_missing(sessions, store["sae"], embedder)
    query = embedder.embed(["rivers and lakes"])[0]
    with sessions() as session:
        before = semantic_search(session, store["sae"], query, 1)[0]
    with sessions.begin() as session:  # a better explanation for latent 1 (was brackets)
        latent = session.scalars(select(Latent).where(Latent.sae_id == store["sae"],
                                                      Latent.index == 1)).one()
        session.add(Explanation(latent_id=latent.id, text="names of rivers", source="human",
                                score=0.9))
        latent.explanation = "names of rivers"
    with sessions() as session:  # matched by its old explanation until the new is embedded
        brackets = embedder.embed(["brackets"])[0]
        assert semantic_search(session, store["sae"], brackets, 1)[0][0].index == 1
    embed_missing(sessions, store["sae"], embedder)
    with sessions() as session:
        latent, similarity = semantic_search(session, store["sae"], query, 1)[0]
        assert semantic_search(session, store["sae"], brackets, 1)[0][0].index != 1
    assert latent.index == 1 and similarity > before[1]


def test_combined_search_keeps_full_text_hits_and_adds_meaning(store, embedder) -> None:
    embed_missing(store["sessions"], store["sae"], embedder)
    with store["sessions"]() as session:
        exact = search_explanations(session, store["sae"], "brackets")
        assert [lat.index for lat in exact] == [1]
        vector = embedder.embed(["brackets"])[0]
        hits = combined_hits(session, store["sae"], "brackets", vector, limit=5)
        assert hits[0].latent.index == 1 and hits[0].match == "both"
        assert hits[0].similarity is not None and hits[0].similarity > 0.5
        cities = combined_hits(session, store["sae"], "town in france",
                               embedder.embed(["town in france"])[0], limit=5)
        assert cities[0].latent.index == 2 and cities[0].match == "meaning"
        # unrelated explanations fall below the similarity floor
        assert len(cities) < len(EXPLANATIONS)
        latents = combined_search(session, store["sae"], "def", embedder, limit=10)
        assert latents[0].index == 0
        assert [lat.index for lat in combined_search(session, store["sae"], "def", None)] == [0]


def test_full_text_hits_come_first_on_equal_ranks(store, embedder) -> None:
    embed_missing(store["sessions"], store["sae"], embedder)
    with store["sessions"]() as session:
        # "digits" matches latent 3 by text; the vector points at latent 2's meaning
        hits = combined_hits(session, store["sae"], "digits",
                             embedder.embed(["names of cities in Europe"])[0], limit=2)
    assert [(h.latent.index, h.match) for h in hits] == [(3, "text"), (2, "meaning")]


def test_the_cache_sees_embeddings_reset_and_refilled(store, embedder) -> None:
    sessions = store["sessions"]
    embed_missing(sessions, store["sae"], embedder)
    query = embedder.embed(["town in france"])[0]

    def first() -> int:
        with sessions() as session:
            return semantic_search(session, store["sae"], query, 1)[0][0].index

    assert first() == 2
    with sessions.begin() as session:  # ORM None: a JSON null, not an SQL NULL
        latent = session.scalars(select(Latent).where(Latent.sae_id == store["sae"],
                                                      Latent.index == 2)).one()
        for explanation in session.scalars(select(Explanation).where(
                Explanation.latent_id == latent.id)):
            explanation.embedding = None
    assert first() != 2
    assert embed_missing(sessions, store["sae"], embedder) == 1
    assert first() == 2
