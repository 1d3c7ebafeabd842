"""The explorer's depth on a copy of the analysed embedded SAE: lists of latents with notes
and their exports, the feature map's data, co-firing latents, and two SAEs compared."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.settings import Settings
from app.store.db import open_store
from app.store.models import Sae
from app.store.persist import save_feature_map
from app.web.engine import InferenceEngine
from app.web.main import create_app
from training.analysis.feature_map import decoder_map
from training.sae.folder import load_sae

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def depth(explorer_data, embedded_sae, embedded_model, tmp_path_factory):
    """The store copy with a feature map, and a second SAE: the first with half its
    decoder rows replaced by random directions (for the comparison)."""
    root = tmp_path_factory.mktemp("depth")
    db = root / "store.db"
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), db)
    sessions = open_store(f"sqlite:///{db}")
    sae_id = explorer_data["sae_id"]
    sae, _ = load_sae(embedded_sae["sae"])
    save_feature_map(sessions, sae_id, decoder_map(sae.w_dec))
    other = root / "other-sae"
    shutil.copytree(embedded_sae["sae"], other)
    for name in ("sae.safetensors", "sae_weights.safetensors"):
        weights = load_file(str(other / name))
        torch.manual_seed(0)
        weights["W_dec"][512:] = torch.randn(512, weights["W_dec"].shape[1])
        (other / name).unlink()
        save_file(weights, str(other / name))
    with sessions.begin() as session:
        first = session.get(Sae, sae_id)
        first.config = {**(first.config or {}), "activations": "/captures/l3"}
        first.metrics = {**(first.metrics or {}), "heldout_fvu": 0.2, "l0": 16.0}
        session.add(Sae(model_id=first.model_id, name="perturbed", path=str(other),
                        architecture=first.architecture, layer=first.layer, d_in=first.d_in,
                        n_latents=first.n_latents, k=first.k,
                        config={"activations": "/captures/l3"},
                        metrics={"heldout_fvu": 0.35, "l0": 8.0}))
    sessions.kw["bind"].dispose()
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{db}",
                        broker_url=f"sqla+sqlite:///{root / 'broker.db'}")
    engine = InferenceEngine(settings)
    engine.preload_model(embedded_model.name, embedded_model)
    with TestClient(create_app(settings, engine)) as client:
        yield client, sae_id


def _csrf(client) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/lists").text).group(1)


def test_lists_hold_latents_with_notes_and_export(depth) -> None:
    client, sae_id = depth
    token = _csrf(client)
    made = client.post("/lists", data={"name": "syntax", "description": "code latents",
                                       "csrf_token": token}, follow_redirects=False)
    assert made.status_code == 303
    url = made.headers["location"]
    list_id = int(url.rsplit("/", 1)[1])
    offer = client.get(f"/lists?sae={sae_id}&index=5").text
    assert "Add latent #5" in offer
    for index, note in ((5, "brackets?"), (9, ""), (5, "closing brackets")):
        added = client.post(f"/lists/{list_id}/items", data={
            "sae_id": sae_id, "index": index, "note": note, "csrf_token": token},
            follow_redirects=False)
        assert added.status_code == 303
    page = client.get(url).text
    assert page.count('/features/5"') == 1 and "closing brackets" in page  # note updated
    exported = client.get(f"{url}/export.json").json()
    assert [(i["index"], i["note"]) for i in exported["items"]] == [(5, "closing brackets"),
                                                                   (9, "")]
    neuronpedia = client.get(f"{url}/neuronpedia.json").json()
    assert neuronpedia["features"][0] == {"modelId": "smollm2-135m",
                                          "layer": f"3-saelab-{sae_id}", "index": "5",
                                          "description": "closing brackets"}
    bad = client.post(f"/lists/{list_id}/items", data={"sae_id": sae_id, "index": 10**6,
                                                       "csrf_token": token})
    assert bad.status_code == 422
    assert client.post("/lists/999/items", data={"sae_id": sae_id, "index": 1,
                                                  "csrf_token": token}).status_code == 404
    assert client.get("/lists/999").status_code == 404


def test_feature_map_and_cofiring(depth) -> None:
    client, sae_id = depth
    points = client.get(f"/api/v1/saes/{sae_id}/map").json()
    assert len(points["index"]) == 1024 and len(points["x"]) == 1024
    assert all(isinstance(x, float) for x in points["x"][:10])
    page = client.get(f"/saes/{sae_id}/map").text
    assert 'id="feature-map"' in page and "plotly.min.js" in page
    busiest = client.get(f"/api/v1/saes/{sae_id}/features?sort=density&limit=1").json()[0]
    assert busiest["cofiring"] and all(0 <= jac <= 1 for _, jac, _ in busiest["cofiring"])
    feature = client.get(f"/saes/{sae_id}/features/{busiest['index']}").text
    assert 'id="cofiring"' in feature and "Jaccard" in feature


def test_two_saes_compared_by_decoder_cosine(depth) -> None:
    client, sae_id = depth
    page = client.get(f"/compare?a={sae_id}&b={sae_id + 1}&threshold=0.7")
    assert page.status_code == 200
    shares = re.findall(r"<td>([\d.]+)%</td>", page.text.split('id="compare-summary"')[1])
    unmatched_a = float(shares[0])
    assert 40 <= unmatched_a <= 60, unmatched_a  # half the rows were replaced
    assert page.text.count("mutual</span>") >= 40
    assert client.get(f"/compare?a={sae_id}&b=999").status_code == 404
    assert "Compare two SAEs" in client.get("/compare").text


def test_saes_of_one_capture_show_their_frontier(depth) -> None:
    client, sae_id = depth
    page = client.get(f"/saes/{sae_id}").text
    assert 'data-plot="frontier"' in page and "the L0–FVU frontier" in page
    table = page.split('id="frontier"')[1]
    assert table.index("perturbed") < table.index('class="current"'), "sorted by L0"
    assert "0.3500" in table and "0.2000" in table
    assert 'data-plot="frontier"' not in client.get(f"/saes/{sae_id + 1}/features/0").text
