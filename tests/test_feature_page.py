"""The feature page on a synthetic analysis (8 latents × 20 top examples + 10 quantile
buckets of 5) in SQLite and PostgreSQL: what it shows at once and what it loads on demand,
the few queries it costs, its token shading, and 4xx (never 5xx) answers for bad input."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from app.bench.store import synthetic_analysis
from app.settings import Settings
from app.store.db import open_store
from app.store.example_pack import pack_records
from app.store.models import Latent, LatentExamples
from app.store.persist import save_analysis
from app.web.main import create_app
from app.web.render import example_html, heat, token_spans

HX = {"HX-Request": "true"}
RAMP = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 0.3] + [0.0] * 26
"""Activations of latent 3's strongest example (max activation 1.0)."""


@pytest.fixture
def feature_client(db_url: str, tmp_path: Path):
    """A client on the synthetic analysis, and the list of SQL statements it runs."""
    sessions = open_store(db_url)
    result, text = synthetic_analysis(8, 70)
    sae_id = save_analysis(sessions, sae_dir=tmp_path / "sae", sae_cfg={
        "architecture": "topk", "hook_layer": 6, "d_in": 576, "d_sae": 8, "k": 4},
        model_name="synthetic-model", d_model=576, n_layers=30, result=result,
        token_text={i: {0: "<script>", 1: "\n"}.get(i % 7, t) for i, t in text.items()})
    with sessions.begin() as session:
        latent = session.scalar(select(Latent).where(Latent.sae_id == sae_id,
                                                     Latent.index == 3))
        latent.max_activation = 1.0
        examples = latent.examples
        examples[0] = replace(examples[0], activations=RAMP)  # the strongest top example
        session.execute(update(LatentExamples).where(LatentExamples.latent_id == latent.id)
                        .values(data=pack_records(examples)))
    sessions.kw["bind"].dispose()
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url,
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    statements: list[str] = []
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.sessions.kw["bind"]
        event.listen(engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        yield client, sae_id, statements


def test_the_page_shows_top_examples_and_the_highest_bucket_in_four_queries(
        feature_client) -> None:
    client, sae_id, statements = feature_client
    client.get(f"/saes/{sae_id}/features/3")  # warm: the session's first connection
    statements.clear()
    page = client.get(f"/saes/{sae_id}/features/3")
    assert page.status_code == 200
    assert len(statements) <= 3, statements
    top = page.text.split('id="top-examples"')[1].split("</section>")[0]
    assert top.count('class="example"') == 20
    assert "Quantile bucket 10 (the highest)" in page.text and "· 5 samples" in page.text
    highest = page.text.split("Quantile bucket 10 (the highest)")[1].split("</details>")[0]
    assert highest.count('class="example"') == 5
    closed = re.findall(r'hx-get="/saes/\d+/features/3\?bucket=(\d+)"', page.text)
    assert sorted(map(int, closed)) == list(range(9))
    assert page.text.count("· 5 samples</summary>") == 10
    assert "&lt;script&gt;" in page.text and "<script>" not in top
    assert '<span class="ws">↵</span>' in page.text


def test_closed_buckets_load_as_fragments(feature_client) -> None:
    client, sae_id, _ = feature_client
    group = client.get(f"/saes/{sae_id}/features/3?bucket=4", headers=HX)
    assert group.status_code == 200 and "<html" not in group.text
    assert group.text.count('class="example"') == 5 and 'class="tok' in group.text


def test_tokens_are_shaded_by_activation_with_the_value_on_each(feature_client) -> None:
    client, sae_id, _ = feature_client
    page = client.get(f"/saes/{sae_id}/features/3").text
    first = page.split('id="top-examples"')[1].split('<div class="example">')[1]
    spans = re.findall(r'<span class="(tok[^"]*)"( style="[^"]*")? data-act="([^"]+)">', first)
    assert [float(act) for _, _, act in spans] == RAMP
    assert [css for css, _, _ in spans].count("tok peak") == 1
    assert spans[RAMP.index(1.0)][0] == "tok peak"
    for _, style, act in spans:
        value = float(act)
        assert style == (f' style="{heat(value, 1.0)}"' if value > 0 else "")


@pytest.mark.parametrize("path, status", [
    ("/saes/{sae}/features/8", {404}),               # the SAE has latents 0 to 7
    ("/saes/999/features/0", {404}),
    ("/saes/{sae}/features/3?bucket=10", {404}),     # buckets 0 to 9
    ("/saes/{sae}/features/3?bucket=-1", {422}),
    ("/saes/{sae}/features/3?bucket=x", {422}),
    ("/saes/{sae}/features/-1", {422}),
    ("/saes/{sae}/features/3?bucket=" + "9" * 30, {422}),   # beyond the INTEGER columns
    ("/saes/{sae}/features/" + "9" * 30, {422}),
    ("/saes/" + "9" * 30 + "/features/0", {422}),
])
def test_unknown_latents_and_buckets_are_4xx(feature_client, path, status) -> None:
    client, sae_id, _ = feature_client
    answer = client.get(path.format(sae=sae_id), headers=HX)
    assert answer.status_code in status, answer.text
    assert len(answer.content) < 2_000


def test_token_spans_escape_mark_and_shade() -> None:
    html = str(token_spans(["<b>", " ", "\t", "a"], [0.5, 0.0, 2.0, -1.0], 1.0, peak=2))
    assert html.startswith('<span class="tokens">') and "<b>" not in html
    assert '<span class="tok" style="background-color: rgba(255, 122, 0, 0.50)" ' \
           'data-act="0.500">&lt;b&gt;</span>' in html
    assert '<span class="tok" data-act="0.000"><span class="ws">·</span></span>' in html
    assert '<span class="tok peak" style="background-color: rgba(255, 122, 0, 1.00)" ' \
           'data-act="2.000"><span class="ws">⇥</span></span>' in html
    assert '<span class="tok" data-act="-1.000">a</span>' in html
    assert "style" not in str(token_spans(["a"], [0.5], 0.0))  # no scale: no shade
    assert str(example_html([], [], 1.0)).count('class="tokens"') == 1


def test_more_concurrent_pages_than_threads_and_connections(feature_client) -> None:
    """40 pages at once through 2 worker threads and at most 15 connections: each
    request's connection is released without waiting behind other requests' endpoints."""
    import asyncio

    import anyio.to_thread
    import httpx

    client, sae_id, _ = feature_client

    async def burst() -> list[int]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            answers = await asyncio.wait_for(asyncio.gather(*(
                c.get(f"/saes/{sae_id}/features/{i % 8}") for i in range(40))), 25)
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 40


BIG = [2**31, 2**40, 2**63, 10**30]
ID_ROUTES = ["/saes/{id}", "/saes/{id}/goto?index=0", "/saes/{id}/map", "/saes/{id}/probe",
             "/api/v1/saes/{id}", "/api/v1/saes/{id}/features", "/api/v1/saes/{id}/map",
             "/api/v1/saes/{sae}/features/{id}", "/saes/{sae}/goto?index={id}",
             "/jobs/{id}", "/api/v1/jobs/{id}", "/lists/{id}", "/lists/{id}/export.json",
             "/steer?sae={id}", "/compare?a={id}&b={sae}"]


@pytest.mark.parametrize("route", ID_ROUTES)
def test_ids_past_the_store_columns_are_4xx_on_every_route(feature_client, route) -> None:
    """An id no INTEGER column can hold (past 32 bits on PostgreSQL, past 64 anywhere)
    is a 404 or 422 with a message, never a 500."""
    client, sae_id, _ = feature_client
    for big in BIG:
        answer = client.get(route.format(id=big, sae=sae_id))
        assert answer.status_code in (404, 422), (big, answer.status_code, answer.text[:300])
