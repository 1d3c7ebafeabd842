"""The Add-an-SAE page (fast: no model is loaded): a folder inside the allowed roots is read
and queued as the analyze job ``saelab import-sae`` queues; a path outside the roots, a
folder that is not an SAE, or one that leaves the model or layer unsaid comes back as the
form with the problem under its field (422) and no job row; without the admin token,
nothing is queued."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from app.settings import Settings
from app.store.db import open_store
from app.store.models import Job
from app.web.main import create_app
from tests import dictlearn_lib as dl
from training.sae.autoencoder import SaeConfig, SparseAutoencoder
from training.sae.folder import save_sae

HX = {"HX-Request": "true", "HX-Target": "add-form"}


def _settings(tmp_path: Path, tiny_llama_dir: Path, **extra) -> Settings:
    (tmp_path / "data").mkdir(exist_ok=True)
    return Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 's.db'}",
                    broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                    allowed_paths=[str(tiny_llama_dir)], **extra)


@pytest.fixture
def settings(tmp_path, tiny_llama_dir) -> Settings:
    return _settings(tmp_path, tiny_llama_dir)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def saelab_folder(folder: Path, model: str, layer: int | None = 1) -> Path:
    """A saelab SAE folder on the tiny model (d = 64); ``layer`` None: one that does not
    say which layer it reads."""
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8))
    save_sae(folder, sae, 1.0, model=model, layer=layer if layer is not None else 0,
             context=128)
    if layer is None:
        cfg = json.loads((folder / "cfg.json").read_text())
        del cfg["hook_layer"], cfg["hook_name"]
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _csrf(client) -> str:
    page = client.get("/saes/add")
    assert page.status_code == 200
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def _post(client, headers: dict | None = None, **form):
    data = {"csrf_token": _csrf(client), "dataset": "embedded", "tokens": "4096", **form}
    return client.post("/saes/add", data=data, headers=headers or {}, follow_redirects=False)


def _jobs(settings) -> list[Job]:
    sessions = open_store(settings.database_url)
    with sessions() as session:
        rows = list(session.scalars(select(Job)))
    sessions.kw["bind"].dispose()
    return rows


@pytest.mark.parametrize("kind", ["saelab", "dictionary_learning"])
def test_a_folder_is_checked_and_queued_as_an_analyze_job(kind, client, settings,
                                                          tiny_llama_dir) -> None:
    folder = settings.data_dir / "imports" / kind
    if kind == "saelab":
        saelab_folder(folder, str(tiny_llama_dir))
    else:
        dl.saved("BatchTopKSAE", folder, model=str(tiny_llama_dir), layer=1)
    home = client.get("/")
    assert 'href="/saes/add"' in home.text
    answer = _post(client, sae=f"imports/{kind}")  # relative to the data dir
    assert answer.status_code == 303, answer.text
    (job,) = _jobs(settings)
    assert answer.headers["location"] == f"/jobs/{job.id}"
    assert (job.kind, job.state) == ("analyze", "queued")
    assert {k: job.params[k] for k in ("sae", "model", "layer", "dataset", "analyze_tokens")} \
        == {"sae": str(folder.resolve()), "model": str(tiny_llama_dir.resolve()), "layer": 1,
            "dataset": "embedded", "analyze_tokens": 4096}
    page = client.get(answer.headers["location"])
    assert page.status_code == 200 and str(folder.resolve()) in page.text
    again = _post(client, HX, sae=str(folder), model=str(tiny_llama_dir), layer="1")
    assert again.status_code == 204 and again.headers["HX-Redirect"].startswith("/jobs/")


def test_a_saelens_transcoder_is_queued_and_a_misplaced_one_refused(client, settings,
                                                                    tiny_llama_dir) -> None:
    """A SAELens transcoder of block 1's MLP is queued like an SAE; one that reads
    TransformerLens' norm output before its gain comes back under its field."""
    tc = pytest.importorskip("sae_lens.saes.transcoder", reason="sae-lens: the dev extra")

    def saved(name: str, hook: str) -> Path:
        cfg = tc.SkipTranscoderConfig(d_in=64, d_sae=96, d_out=64, apply_b_dec_to_input=False)
        cfg.metadata.model_name, cfg.metadata.hook_name = str(tiny_llama_dir), hook
        cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
        tc.SkipTranscoder(cfg).save_model(settings.data_dir / name)
        return settings.data_dir / name

    good = saved("tc", "blocks.1.mlp.hook_in")
    answer = _post(client, sae="tc")
    assert answer.status_code == 303, answer.text
    (job,) = _jobs(settings)
    assert (job.kind, job.params["sae"], job.params["layer"]) == (
        "analyze", str(good.resolve()), 1)
    answer = _post(client, HX, sae="tc", layer="2")
    assert answer.status_code == 422 and "reads the MLP of block 1, not 2" in answer.text
    saved("before-gain", "blocks.1.ln2.hook_normalized")
    answer = _post(client, HX, sae="before-gain")
    assert answer.status_code == 422 and 'data-field="sae"' in answer.text
    assert "before its gain" in answer.text
    assert len(_jobs(settings)) == 1


def test_a_path_outside_the_allowed_roots_creates_nothing(client, settings, tiny_llama_dir,
                                                          tmp_path) -> None:
    outside = saelab_folder(tmp_path / "outside", str(tiny_llama_dir))
    for path in (str(outside), "../outside", "/etc"):
        answer = _post(client, HX, sae=path)
        assert answer.status_code == 422
        assert "outside the data dir and the allowed roots" in answer.text
        assert 'data-field="sae"' in answer.text and "<html" not in answer.text
    assert _jobs(settings) == []


def test_a_folder_that_is_not_an_sae_or_says_too_little_creates_nothing(
        client, settings, tiny_llama_dir) -> None:
    empty = settings.data_dir / "empty"
    empty.mkdir()
    answer = _post(client, sae=str(empty))
    assert answer.status_code == 422 and "<html" in answer.text
    assert "is not an SAE folder" in answer.text and 'data-field="sae"' in answer.text
    broken = settings.data_dir / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{not json")
    assert "cannot read the SAE" in _post(client, HX, sae=str(broken)).text
    for name, tensors in (("no-encoder", ["W_enc"]), ("flat-encoder", None)):
        cut = saelab_folder(settings.data_dir / name, str(tiny_llama_dir))
        weights = load_file(str(cut / "sae.safetensors"))
        if tensors:  # a saelab folder missing a tensor, or with one of the wrong rank
            weights = {k: v for k, v in weights.items() if k not in tensors}
        else:
            weights["W_enc"] = weights["W_enc"].reshape(-1)
        save_file(weights, str(cut / "sae.safetensors"))
        answer = _post(client, HX, sae=str(cut))
        assert answer.status_code == 422 and "cannot read the SAE" in answer.text, name
    unsaid = saelab_folder(settings.data_dir / "unsaid", "", layer=None)
    answer = _post(client, HX, sae=str(unsaid))
    assert answer.status_code == 422 and 'data-field="model"' in answer.text
    assert "does not name the model it was trained on: enter it here" in answer.text
    answer = _post(client, HX, sae=str(unsaid), model=str(tiny_llama_dir))
    assert answer.status_code == 422 and 'data-field="layer"' in answer.text
    placed = saelab_folder(settings.data_dir / "placed", str(tiny_llama_dir), layer=1)
    answer = _post(client, HX, sae=str(placed), layer="2")
    assert "reads the output of block 1, not 2" in answer.text
    answer = _post(client, HX, sae=str(placed), model="smollm2-135m")
    assert answer.status_code == 422 and 'data-field="model"' in answer.text
    assert "has d_in 64 but smollm2-135m has width 576" in answer.text
    answer = _post(client, HX, sae=str(unsaid), model=str(tiny_llama_dir), layer="9")
    assert answer.status_code == 422 and "the model has 4 decoder blocks" in answer.text
    assert 'value="9"' in answer.text  # the form keeps what was typed
    assert _jobs(settings) == []


def test_adding_needs_the_admin_token_when_one_is_set(tmp_path, tiny_llama_dir) -> None:
    settings = _settings(tmp_path, tiny_llama_dir, admin_token="s3cret-token")
    saelab_folder(settings.data_dir / "sae", str(tiny_llama_dir))
    with TestClient(create_app(settings)) as client:
        assert "needs the admin token" in client.get("/saes/add").text
        assert _post(client, sae="sae").status_code == 401
        assert _post(client, {"Authorization": "Bearer s3cret-token"},
                     sae="sae").status_code == 303
    assert len(_jobs(settings)) == 1
