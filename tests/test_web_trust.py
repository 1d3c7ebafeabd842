"""What the explorer says about a latent, on a copy of the analysed embedded SAE: sink
flags, every score with its sample size (or "not measured"), steerability and the steer
page starting from the best strength, the dead share with its token count, and the probe
ranking latents relative to their own max with sinks last."""

from __future__ import annotations

import re
import shutil

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.settings import Settings
from app.store.db import open_store
from app.store.explanations import NewExplanation, save_explanations
from app.store.models import Latent
from app.web.engine import InferenceEngine
from app.web.main import create_app

pytestmark = pytest.mark.slow
STEER = {"index": 0, "steerability": 0.625, "best_strength": 4.0, "prompts": 8, "rise": 0.1,
         "fluency_bound": 1.0, "strengths": []}


@pytest.fixture
def trusted(explorer_data, embedded_model, tmp_path):
    """The explorer on a store copy where latent A is a sink, B has a maxact label scored
    on 40 questions and a steer-eval record, and C an unscored label."""
    db = tmp_path / "store.db"
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    sessions = open_store(url)
    sae_id = explorer_data["sae_id"]
    with sessions.begin() as session:
        rows = session.scalars(select(Latent).where(Latent.sae_id == sae_id, Latent.density > 0)
                               .order_by(Latent.density.desc()).limit(40)).all()
        sink, scored, unscored = rows[20], rows[21], rows[22]
        sink.sink, sink.sink_reason = True, "max activation 11.0× the SAE's median (2.00)"
        scored.steerability, scored.steer_eval = 0.625, {**STEER, "index": scored.index}
        ids = (sink.index, scored.index, unscored.index, scored.id, unscored.id)
    save_explanations(sessions, [
        NewExplanation(ids[3], '"def" at line start', "maxact-1", "k", detection=0.9,
                       fuzzing=0.8, simulation=0.7, detection_n=40, fuzzing_n=36,
                       simulation_n=40),
        NewExplanation(ids[4], "rare words", "maxact-1", "k")])
    sessions.kw["bind"].dispose()
    engine = InferenceEngine(Settings(data_dir=tmp_path / "engine"))
    engine.preload_model(embedded_model.name, embedded_model)
    settings = Settings(data_dir=tmp_path / "data", database_url=url,
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    with TestClient(create_app(settings, engine)) as client:
        yield client, sae_id, ids[:3]


def test_feature_page_shows_sinks_scores_with_their_sizes_and_steerability(trusted) -> None:
    client, sae_id, (sink, scored, unscored) = trusted
    page = client.get(f"/saes/{sae_id}/features/{sink}").text
    assert 'class="badge sink"' in page and "Attention-sink" in page and "11.0×" in page
    page = client.get(f"/saes/{sae_id}/features/{scored}").text
    assert "detection 0.9" in page and "(n=40)" in page and "(n=36)" in page
    assert "simulation 0.7" in page
    headline = page.split('<p class="explanation">')[1].split("</p>")[0].strip()
    assert headline == "&#34;def&#34; at line start", "a maxact label is not wrapped in “…”"
    assert "Steerability <strong>62.5%</strong>" in page and "best at clamp 4" in page
    assert f"feature={scored}&amp;value=4.0" in page
    page = client.get(f"/saes/{sae_id}/features/{unscored}").text
    assert "unscored" in page and "Steerability not measured" in page
    steer = client.get(f"/steer?sae={sae_id}&feature={scored}").text
    assert re.search(r'name="value" step="any" value="4.0"', steer)
    listed = client.get(f"/saes/{sae_id}?sort=steerability").text.split('id="latent-list"')[1]
    assert re.search(r'/features/(\d+)"', listed).group(1) == str(scored)
    api = client.get(f"/api/v1/saes/{sae_id}/features/{scored}").json()
    assert api["steerability"] == 0.625 and api["explanations"][0]["detection_n"] == 40
    assert client.get(f"/api/v1/saes/{sae_id}/features/{sink}").json()["sink"] is True


def test_dead_share_comes_from_the_analysis_with_its_token_count(trusted) -> None:
    client, _, _ = trusted
    record = client.get("/api/v1/saes").json()[0]
    assert 0 <= record["dead_share"] <= 1 and record["analysed_tokens"] >= 8192
    assert record["headline"]["dead_share"] == record["dead_share"]
    home = client.get("/").text
    assert f"of {record['analysed_tokens']:,} tok." in home


def test_probe_ranks_relative_to_each_latents_max_with_sinks_last(trusted) -> None:
    client, sae_id, _ = trusted
    text = "def main():\n    return 42 + x"
    relative = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": text}).json()
    top = relative["top_features"]
    assert all(t["relative"] >= 0 for t in top)
    flags = [t["sink"] for t in top]
    assert flags == sorted(flags), "sinks come after every other latent"
    unflagged = [t["relative"] for t in top if not t["sink"]]
    assert unflagged == sorted(unflagged, reverse=True)
    raw = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": text, "rank": "raw",
                                             "include_sinks": True}).json()["top_features"]
    assert [t["max"] for t in raw] == sorted((t["max"] for t in raw), reverse=True)
