"""The explorer's routes on the analysed embedded SAE: full pages, HTMX fragments, the JSON
API, probing and streamed steering with the real model, CSRF, the admin token, and clean
404/422 answers for bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.settings import Settings
from app.store.models import Job
from app.web.engine import InferenceEngine
from app.web.main import create_app
from app.web.render import visible

pytestmark = pytest.mark.slow
HX = {"HX-Request": "true"}


def _settings(explorer_data, tmp_path, **extra) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=explorer_data["db_url"],
                    broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", **extra)


@pytest.fixture(scope="module")
def shared_engine(embedded_model, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("engine"))
    engine = InferenceEngine(settings)
    engine.preload_model(embedded_model.name, embedded_model)
    return engine


@pytest.fixture
def client(explorer_data, shared_engine, tmp_path):
    with TestClient(create_app(_settings(explorer_data, tmp_path), shared_engine)) as c:
        yield c


def _csrf(client) -> str:
    page = client.get("/jobs")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_home_lists_the_sae_with_metrics_and_a_jobs_fragment(client, explorer_data) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text
    assert f'href="/saes/{explorer_data["sae_id"]}"' in page.text
    assert "smollm2-135m" in page.text and "%" in page.text
    fragment = client.get("/", headers={**HX, "HX-Target": "recent-jobs"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert "No jobs yet" in fragment.text


def test_sae_page_sorts_searches_and_scrolls(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    page = client.get(f"/saes/{sae_id}")
    assert page.status_code == 200 and 'data-plot="line"' in page.text
    assert page.text.count(f'href="/saes/{sae_id}/features/') >= 50
    assert 'hx-trigger="revealed"' in page.text
    by_density = client.get(f"/api/v1/saes/{sae_id}/features?sort=density&limit=3").json()
    densest = by_density[0]["index"]
    sorted_page = client.get(f"/saes/{sae_id}?sort=density")
    first = re.search(rf'href="/saes/{sae_id}/features/(\d+)"', sorted_page.text.split(
        'id="latent-list"')[1]).group(1)
    assert int(first) == densest
    more = client.get(f"/saes/{sae_id}?sort=index&offset=50", headers=HX)
    assert "<html" not in more.text and '/features/50"' in more.text
    found = client.get(f"/saes/{sae_id}?q=python", headers={**HX, "HX-Target": "latent-list"})
    assert "python keywords in code" in found.text and "<html" not in found.text
    assert client.get(f"/saes/{sae_id}?q=zzzqqq", headers={
        **HX, "HX-Target": "latent-list"}).text.count("No explanation matches") == 1


def test_feature_page_highlights_tokens_and_escapes_text(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    index = next(i for i, t in explorer_data["explained"].items() if "script" in t)
    page = client.get(f"/saes/{sae_id}/features/{index}")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>alert(1)" not in page.text
    assert re.search(r'class="tok[^"]*" style="background-color: rgba\(255, 122, 0, 1\.00\)',
                     page.text), "the peak token is highlighted at full strength"
    assert 'data-plot="hist"' in page.text and "Quantile" in page.text
    bucket = int(re.search(r'\?bucket=(\d+)"', page.text).group(1))
    group = client.get(f"/saes/{sae_id}/features/{index}?bucket={bucket}", headers=HX)
    assert group.status_code == 200 and "<html" not in group.text
    assert group.text.count('class="example"') >= 1 and 'class="tok' in group.text
    missing = client.get(f"/saes/{sae_id}/features/{index}?bucket=99", headers=HX)
    assert missing.status_code == 404
    assert f"/steer?sae={sae_id}&amp;feature={index}" in page.text
    assert f"/saes/{sae_id}/probe?feature={index}" in page.text
    neighbour = client.get(f"/api/v1/saes/{sae_id}/features/{index}").json()["neighbours"][0]
    assert f'href="/saes/{sae_id}/features/{int(neighbour[0])}"' in page.text


def test_visible_whitespace_and_escaping() -> None:
    assert str(visible("\n")) == '<span class="ws">↵</span>'
    assert str(visible("  ")) == '<span class="ws">··</span>'
    assert str(visible("<b>")) == "&lt;b&gt;"


def test_bad_ids_and_params_are_404_and_422_never_500(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    for path in ("/saes/999", f"/saes/{sae_id}/features/99999", "/jobs/424242",
                 f"/saes/{sae_id}/goto?index=99999", "/steer?sae=999", "/nope"):
        response = client.get(path)
        assert response.status_code == 404 and "<html" in response.text, path
    for path in (f"/saes/{sae_id}/features/abc", f"/saes/{sae_id}?sort=bogus",
                 f"/saes/{sae_id}?offset=-1"):
        response = client.get(path)
        assert response.status_code == 422 and "error" in response.text, path
    api = client.get("/api/v1/saes/999")
    assert api.status_code == 404 and api.json() == {"detail": "there is no SAE 999"}
    assert "limit" in client.get(f"/api/v1/saes/{sae_id}/features?limit=0").json()["detail"]
    goto = client.get(f"/saes/{sae_id}/goto?index=7", follow_redirects=False)
    assert goto.status_code == 303 and goto.headers["location"].endswith("/features/7")


def test_api_mirrors_the_pages(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    saes = client.get("/api/v1/saes").json()
    assert [s["id"] for s in saes] == [sae_id]
    assert saes[0]["headline"]["l0"] > 0
    rows = client.get(f"/api/v1/saes/{sae_id}/features?sort=max_activation&limit=5").json()
    assert len(rows) == 5 and rows[0]["max_activation"] >= rows[-1]["max_activation"]
    one = client.get(f"/api/v1/saes/{sae_id}/features/{rows[0]['index']}").json()
    assert one["examples"] and one["explanation_score"] in (None, 0.8)
    searched = client.get(f"/api/v1/saes/{sae_id}/features?search=punctuation").json()
    assert [r["explanation"] for r in searched] == ["punctuation marks"]
    assert "/api/v1/steer" in client.get("/openapi.json").json()["paths"]


def test_probe_page_and_api_agree_with_the_engine(client, explorer_data, embedded_model,
                                                  embedded_sae) -> None:
    from training.inference.probe import probe_text
    from training.sae.folder import load_sae

    sae_id, text = explorer_data["sae_id"], "def main():\n    return 42"
    sae, cfg = load_sae(embedded_sae["sae"])
    direct = probe_text(embedded_model, sae, int(cfg["hook_layer"]), text)
    feature = direct.top_features(1)[0][0]
    api = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": text,
                                             "feature": feature, "rank": "raw",
                                             "include_sinks": True}).json()
    assert api["tokens"] == direct.tokens
    assert api["activations"] == pytest.approx(direct.activations_of(feature), abs=1e-4)
    assert api["top_features"][0]["index"] == feature
    token = _csrf(client)
    fragment = client.post(f"/saes/{sae_id}/probe", data={"text": text, "feature": feature},
                           headers={**HX, "HX-Target": "result", "X-CSRF-Token": token})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert f'href="/saes/{sae_id}/features/{feature}"' in fragment.text
    assert fragment.text.count('class="tok pick"') == len(direct.tokens)
    empty = client.post(f"/saes/{sae_id}/probe", data={"text": " "},
                        headers={**HX, "X-CSRF-Token": token})
    assert empty.status_code == 422 and "text:" in empty.text
    bad = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": "x", "feature": 10**6})
    assert bad.status_code == 422 and "feature" in bad.json()["detail"]


def _stream(client, body, tokens: list | None = None) -> dict[str, str]:
    """The two replies of a steering stream; ``tokens`` receives every token event."""
    replies = {"baseline": "", "steered": ""}
    events = []
    tokens = [] if tokens is None else tokens
    with client.stream("POST", "/api/v1/steer", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for block in response.read().decode().split("\n\n"):
            if not block.strip():
                continue
            kind = block.split("\n")[0].removeprefix("event: ")
            data = json.loads(block.split("data: ", 1)[1])
            events.append(kind)
            if kind == "token":
                replies[data["side"]] += data["text"]
                tokens.append(data)
    assert events[-1] == "done" and events.count("token") > 2
    return replies


def test_steering_streams_text_continuations_with_alternatives(client, explorer_data) -> None:
    base = {"sae_id": explorer_data["sae_id"], "prompt": "The capital of France is",
            "temperature": 0, "max_tokens": 12, "seed": 0}
    chat = _stream(client, base)
    events: list[dict] = []
    text = _stream(client, {**base, "format": "text", "top_logprobs": 3}, events)
    assert text["baseline"] != chat["baseline"], "plain text is continued, not answered"
    for event in events:
        logprobs = [t["logprob"] for t in event["top"]]
        assert len(logprobs) == 3 and logprobs == sorted(logprobs, reverse=True)
        assert all(v <= 0 for v in logprobs) and sum(math.exp(v) for v in logprobs) <= 1.001
    # greedy decoding picks the most likely token: a one-token piece is the first alternative
    assert sum(e["text"] == e["top"][0]["token"] for e in events) >= len(events) - 2
    assert "top" not in _stream_first_token(client, base)
    bad = client.post("/api/v1/steer", json={**base, "top_logprobs": 11})
    assert bad.status_code == 422 and "top_logprobs" in bad.json()["detail"]


def _stream_first_token(client, body) -> dict:
    events: list[dict] = []
    _stream(client, body, events)
    return events[0]


def test_steering_streams_two_replies(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    base = {"sae_id": sae_id, "prompt": "Name a colour.", "temperature": 0.8,
            "max_tokens": 24, "seed": 3}
    same = _stream(client, {**base, "features": []})
    assert same["baseline"] and same["baseline"] == same["steered"]
    feature = next(iter(explorer_data["explained"]))
    steered = _stream(client, {**base, "features": [
        {"index": feature, "mode": "clamp", "value": 30}]})
    assert steered["baseline"] == same["baseline"], "the baseline does not depend on steering"
    assert steered["steered"] != steered["baseline"]
    bad = client.post("/api/v1/steer", json={**base, "features": [{"index": 10**6, "value": 1}]})
    assert bad.status_code == 422 and "no latent" in bad.json()["detail"]
    too_long = client.post("/api/v1/steer", json={**base, "max_tokens": 1000})
    assert too_long.status_code == 422 and "max_tokens" in too_long.json()["detail"]


def test_steer_page_search_and_preset(client, explorer_data) -> None:
    sae_id, feature = explorer_data["sae_id"], next(iter(explorer_data["explained"]))
    page = client.get(f"/steer?sae={sae_id}&feature={feature}")
    assert page.status_code == 200 and f'data-index="{feature}"' in page.text
    found = client.get(f"/steer/search?sae={sae_id}&q=punctuation",
                       headers={**HX, "HX-Target": "search-results"})
    assert "punctuation marks" in found.text and "<html" not in found.text
    by_index = client.get(f"/steer/search?sae={sae_id}&q=5", headers=HX)
    assert 'data-index="5"' in by_index.text


def _job_count(explorer_data) -> int:
    from app.store.db import make_engine, session_factory

    engine = make_engine(explorer_data["db_url"])
    with session_factory(engine)() as session:
        count = session.scalar(select(func.count()).select_from(Job))
    engine.dispose()
    return count


def test_job_form_needs_csrf_and_shows_field_errors(client, explorer_data) -> None:
    before = _job_count(explorer_data)
    refused = client.post("/jobs", data={"kind": "pipeline", "layer": "6"})
    assert refused.status_code == 403 and "CSRF" in refused.text
    token = _csrf(client)
    bad = client.post("/jobs", data={"kind": "pipeline", "layer": "-1", "tokens": "many",
                                     "csrf_token": token},
                      headers={**HX, "HX-Target": "job-form"})
    assert bad.status_code == 422 and "<html" not in bad.text
    errors = dict(re.findall(r'data-field="(\w+)">([^<]+)<', bad.text))
    assert set(errors) == {"layer", "tokens"}, errors
    assert 'value="many"' in bad.text, "the form keeps what was typed"
    k_too_big = client.post("/jobs", data={"kind": "pipeline", "layer": "6", "latents": "8",
                                           "k": "16", "csrf_token": token}, headers=HX)
    assert re.findall(r'data-field="(\w+)"', k_too_big.text) == ["k"]
    assert _job_count(explorer_data) == before


def test_job_submitted_from_the_form_can_be_cancelled(client, explorer_data) -> None:
    token = _csrf(client)
    queued = client.post("/jobs", data={"kind": "capture", "layer": "1", "tokens": "256",
                                        "csrf_token": token}, follow_redirects=False)
    assert queued.status_code == 303
    job_url = queued.headers["location"]
    page = client.get(job_url)
    assert page.status_code == 200 and "queued" in page.text
    assert 'hx-trigger="every 1s"' in page.text
    job_id = int(job_url.rsplit("/", 1)[1])
    assert client.get(f"/api/v1/jobs/{job_id}").json()["params"]["tokens"] == 256
    cancelled = client.post(f"{job_url}/cancel", headers={**HX, "X-CSRF-Token": token})
    assert cancelled.status_code == 204 and cancelled.headers["HX-Redirect"] == job_url
    live = client.get(job_url, headers={**HX, "HX-Target": "live"})
    assert "cancelled" in live.text and "every 1s" not in live.text
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 403, "no JSON, no CSRF"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", json={})
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_the_job_form_queues_a_skip_transcoder_pipeline(client, explorer_data) -> None:
    token = _csrf(client)
    form = {"kind": "pipeline", "layer": "1", "tokens": "65536", "site": "mlp", "arch": "",
            "skip": "true", "csrf_token": token}
    queued = client.post("/jobs", data=form, follow_redirects=False)
    assert queued.status_code == 303
    job_id = int(queued.headers["location"].rsplit("/", 1)[1])
    params = client.get(f"/api/v1/jobs/{job_id}").json()["params"]
    assert params["site"] == "mlp" and params["skip"] is True and "arch" not in params
    topk = client.post("/jobs", data={**form, "arch": "topk"}, headers=HX)
    assert topk.status_code == 422 and re.findall(r'data-field="(\w+)"', topk.text) == ["arch"]
    assert 'name="site"' in client.get("/jobs").text
    client.post(f"/api/v1/jobs/{job_id}/cancel", json={}, headers={"X-CSRF-Token": token})


def test_admin_token_guards_mutations(explorer_data, shared_engine, tmp_path) -> None:
    settings = _settings(explorer_data, tmp_path, admin_token="s3cret-token")
    with TestClient(create_app(settings, shared_engine)) as client:
        body = {"kind": "capture", "params": {"layer": -3}}
        assert client.post("/api/v1/jobs", json=body).status_code == 401
        authed = client.post("/api/v1/jobs", json=body,
                             headers={"Authorization": "Bearer s3cret-token"})
        assert authed.status_code == 422 and "layer" in authed.json()["detail"]
        token = _csrf(client)
        form = {"kind": "capture", "layer": "-3", "csrf_token": token}
        assert client.post("/jobs", data=form).status_code == 401
        wrong = client.post("/signin", data={"token": "nope", "csrf_token": token})
        assert wrong.status_code == 401
        right = client.post("/signin", data={"token": "s3cret-token", "csrf_token": token},
                            follow_redirects=False)
        assert right.status_code == 303 and "s3cret" not in right.headers["set-cookie"]
        assert client.post("/jobs", data=form).status_code == 422
        assert client.get("/").status_code == 200, "reading needs no token"


def test_engine_queues_concurrent_probes_and_refuses_when_full(client, explorer_data,
                                                               shared_engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from app.web.engine import MAX_WAITING

    body = {"sae_id": explorer_data["sae_id"], "text": "import os\nprint(os.sep)"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.post("/api/v1/probe", json=body), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert len({json.dumps(a.json()) for a in answers}) == 1
    shared_engine._waiting = MAX_WAITING  # as if MAX_WAITING requests were queued
    try:
        busy = client.post("/api/v1/probe", json=body)
        assert busy.status_code == 503 and "try again" in busy.json()["detail"]
        steer = client.post("/api/v1/steer", json={"sae_id": explorer_data["sae_id"],
                                                   "prompt": "hi", "features": []})
        assert steer.status_code == 503
    finally:
        shared_engine._waiting = 0


def test_contrast_form_and_search_badges(client, explorer_data) -> None:
    sae_id = explorer_data["sae_id"]
    token = _csrf(client)
    found = client.post(f"/saes/{sae_id}/contrast", data={
        "a": "def f(x):\n    return x\n\nclass A:\n    pass",
        "b": "The cat sat on the mat.\n\nIt rained all day in the town.",
        "csrf_token": token}, headers={**HX, "HX-Target": "contrast-result"})
    assert found.status_code == 200 and "<html" not in found.text
    assert found.text.count(f'href="/saes/{sae_id}/features/') >= 3
    empty = client.post(f"/saes/{sae_id}/contrast", data={"a": " ", "b": "x",
                                                         "csrf_token": token}, headers=HX)
    assert empty.status_code == 422 and "a:" in empty.text
    page = client.get(f"/saes/{sae_id}?q=python keywords",
                      headers={**HX, "HX-Target": "latent-list"})
    assert "python keywords in code" in page.text and 'class="badge match-' in page.text


def test_odd_input_is_a_4xx_never_a_500(client, explorer_data, shared_engine, tmp_path
                                         ) -> None:
    sae_id = explorer_data["sae_id"]
    token = _csrf(client)
    long_text = "word " * 3000  # more tokens than a probe takes
    too_long = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": long_text})
    assert too_long.status_code == 422 and "at most" in too_long.json()["detail"]
    page = client.post(f"/saes/{sae_id}/probe", data={"text": long_text, "csrf_token": token},
                       headers=HX)
    assert page.status_code == 422
    assert client.post(f"/saes/{sae_id}/probe", data={"text": "x", "feature": "²",
                                                     "csrf_token": token}).status_code == 422
    base = {"sae_id": sae_id, "prompt": "hi"}
    twice = client.post("/api/v1/steer", json={**base, "features": [
        {"index": 1, "value": 1}, {"index": 1, "mode": "add", "value": 2}]})
    assert twice.status_code == 422 and "once" in twice.json()["detail"]
    blank = client.post("/api/v1/steer", json={**base, "prompt": "   "})
    assert blank.status_code == 422 and "prompt" in blank.json()["detail"]
    assert client.get(f"/saes/{sae_id}/features/{2**70}").status_code in (404, 422)
    assert client.get(f"/steer/search?sae={sae_id}&q={'9' * 30}", headers=HX).status_code < 500
    accented = client.post("/jobs", data={"kind": "capture", "csrf_token": "é" * 40})
    assert accented.status_code == 403
    settings = _settings(explorer_data, tmp_path, admin_token="tøken")
    with TestClient(create_app(settings, shared_engine)) as guarded:
        cookie = "saelab_admin=ünïcode".encode()  # raw bytes, as a browser may send
        assert guarded.get("/", headers={"cookie": cookie}).status_code == 200
        signin = guarded.post("/signin", data={"token": "wrøng", "csrf_token": _csrf(guarded)})
        assert signin.status_code == 401
