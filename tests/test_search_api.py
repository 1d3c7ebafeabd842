"""The search API on the analysed embedded SAE: combined full-text and semantic search of
explanations, and contrastive search of two text sets with the real model."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.settings import Settings
from app.store.db import open_store
from app.store.semantic import embed_missing
from app.web import api_search
from app.web.engine import InferenceEngine
from app.web.main import create_app
from training.autointerp.embeddings import EmbedderUnavailable, text_embedder
from training.inference.probe import MAX_CONTRAST_TEXTS, contrast_texts
from training.sae.folder import load_sae

pytestmark = pytest.mark.slow
CODE = ["def add(a, b):\n    return a + b", "for item in items:\n    print(item)"]
PROSE = ["The river runs slowly past the old mill.", "She wrote a letter to her aunt."]


@pytest.fixture(scope="module")
def shared_engine(embedded_model, tmp_path_factory):
    engine = InferenceEngine(Settings(data_dir=tmp_path_factory.mktemp("engine")))
    engine.preload_model(embedded_model.name, embedded_model)
    return engine


@pytest.fixture(scope="module")
def search_db(explorer_data, tmp_path_factory) -> str:
    """A copy of the explorer's store (others share the original) with its explanations
    embedded."""
    source = explorer_data["db_url"].removeprefix("sqlite:///")
    target = tmp_path_factory.mktemp("search") / "store.db"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    url = f"sqlite:///{target}"
    sessions = open_store(url)
    assert embed_missing(sessions, explorer_data["sae_id"], text_embedder()) == 3
    sessions.kw["bind"].dispose()
    return url


def _with_search(app: FastAPI) -> FastAPI:
    if not any(getattr(r, "path", "") == "/api/v1/saes/{sae_id}/search" for r in app.routes):
        app.include_router(api_search.router)
    return app


@pytest.fixture
def client(search_db, shared_engine, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url=search_db,
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    with TestClient(_with_search(create_app(settings, shared_engine))) as c:
        yield c


def _search(client, sae_id: int, q: str) -> list[dict]:
    answer = client.get(f"/api/v1/saes/{sae_id}/search", params={"q": q, "limit": 5})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_search_finds_words_and_meanings(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    index_of = {text: index for index, text in explorer_data["explained"].items()}
    python = _search(client, sae_id, "python")
    assert python[0]["index"] == index_of["python keywords in code"]
    assert python[0]["match"] == "both" and python[0]["similarity"] > 0.4
    assert {"density", "max_activation", "top_logits", "explanation"} <= set(python[0])
    syntax = _search(client, sae_id, "programming language syntax")
    assert syntax[0]["index"] == index_of["python keywords in code"]
    assert syntax[0]["match"] == "meaning"
    stops = _search(client, sae_id, "commas and full stops")
    assert [(r["index"], r["match"]) for r in stops] == [(index_of["punctuation marks"],
                                                          "meaning")]
    script = _search(client, sae_id, "alert")
    assert [r["index"] for r in script] == [index_of["<script>alert(1)</script>"]]
    assert _search(client, sae_id, "zzzqqq") == []


def test_search_is_full_text_without_the_embedding_model(client, explorer_data,
                                                         monkeypatch) -> None:
    def missing(query: str) -> list[float]:
        raise EmbedderUnavailable("semantic search needs the model: pip install it")

    monkeypatch.setattr(api_search, "_embed", missing)
    sae_id = explorer_data["sae_id"]
    assert [(r["match"], r["similarity"]) for r in _search(client, sae_id, "python")] == [
        ("text", None)]
    assert _search(client, sae_id, "programming language syntax") == []


def test_search_refuses_bad_requests(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    missing = client.get("/api/v1/saes/9999/search", params={"q": "python"})
    assert missing.status_code == 404 and "9999" in missing.json()["detail"]
    for params in ({"q": ""}, {"q": "   "}, {}, {"q": "python", "limit": 0}):
        answer = client.get(f"/api/v1/saes/{sae_id}/search", params=params)
        assert answer.status_code == 422, params
        assert answer.json()["detail"].startswith(("q:", "limit:"))


def test_contrast_matches_the_engine_function(client, explorer_data, embedded_model,
                                              embedded_sae) -> None:
    sae_id = explorer_data["sae_id"]
    answer = client.post(f"/api/v1/saes/{sae_id}/contrast",
                         json={"a": CODE, "b": PROSE, "limit": 10})
    assert answer.status_code == 200, answer.text
    rows = answer.json()
    layer = client.get(f"/api/v1/saes/{sae_id}").json()["layer"]
    expected = contrast_texts(embedded_model, load_sae(embedded_sae["sae"])[0].eval(), layer,
                              CODE, PROSE, limit=10)
    assert [r["index"] for r in rows] == [f for f, *_ in expected]
    for row, (_, score, mean_a, mean_b) in zip(rows, expected, strict=True):
        assert row["score"] == pytest.approx(score, abs=1e-5)
        assert row["mean_max_a"] == pytest.approx(mean_a, abs=1e-4)
        assert row["mean_max_b"] == pytest.approx(mean_b, abs=1e-4)
        assert row["explanation"] == explorer_data["explained"].get(row["index"])
    assert 0 < rows[-1]["score"] <= rows[0]["score"] <= 1


def test_contrast_refuses_bad_requests(client, explorer_data) -> None:
    url = f"/api/v1/saes/{explorer_data['sae_id']}/contrast"
    assert api_search.MAX_TEXTS == MAX_CONTRAST_TEXTS
    assert client.post("/api/v1/saes/9999/contrast",
                       json={"a": CODE, "b": PROSE}).status_code == 404
    bad = [{"a": [], "b": PROSE}, {"a": CODE}, {"a": ["x"] * 33, "b": PROSE},
           {"a": CODE, "b": ["y" * 2001]}, {"a": CODE, "b": [""]},
           {"a": CODE, "b": PROSE, "limit": 0}]
    for body in bad:
        answer = client.post(url, json=body)
        assert answer.status_code == 422, body
        assert answer.json()["detail"].split(".")[0].split(":")[0] in ("a", "b", "limit")
