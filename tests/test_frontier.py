"""The SAE page's frontier groups SAEs by what they were trained and held out on: one
capture, or one stream of the model (a streaming sweep's members), never a mix, and shows
how many tokens each figure was measured on."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.settings import Settings
from app.store.db import open_store
from app.store.models import Model, Sae
from app.web.main import create_app


def _stream_cfg(contexts: int, dataset: str = "embedded") -> dict:
    return {"streamed": True, "activations": None, "dataset": dataset, "context_size": 128,
            "stream_contexts": contexts, "train": {"holdout_rows": 8192}}


def _page(tmp_path, rows: list[tuple[str, dict, dict]]) -> str:
    """The page of the first of ``rows`` (name, config, metrics) in a fresh SQLite store."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    sessions = open_store(url)
    with sessions.begin() as session:
        model = Model(name="m", d_model=4, n_layers=2)
        for name, config, metrics in rows:
            session.add(Sae(model=model, name=name, path=str(tmp_path / name),
                            architecture="topk", layer=1, d_in=4, n_latents=8, k=2,
                            config=config, metrics=metrics))
    sessions.kw["bind"].dispose()
    (tmp_path / "data").mkdir()
    settings = Settings(data_dir=tmp_path / "data", database_url=url,
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    with TestClient(create_app(settings)) as client:
        page = client.get("/saes/1")
    assert page.status_code == 200, page.text
    return page.text


def test_a_streaming_sweeps_members_share_a_frontier(tmp_path) -> None:
    evaluated = {"fvu": 0.3, "l0": 16.0, "tokens": 4096, "ce_loss_recovered": 0.9}
    page = _page(tmp_path, [
        ("n64-k4", _stream_cfg(600), {"heldout_fvu": 0.4, "l0": 4.0, "heldout_rows": 8192}),
        ("n64-k16", _stream_cfg(600), {"heldout_fvu": 0.2, "l0": 16.0,
                                       "heldout_rows": 8192, "eval": evaluated}),
        ("other-length", _stream_cfg(900), {"heldout_fvu": 0.1, "l0": 8.0,
                                            "heldout_rows": 8192}),
        ("other-data", _stream_cfg(600, "wiki"), {"heldout_fvu": 0.1, "l0": 8.0,
                                                  "heldout_rows": 8192}),
        ("a-capture", {"activations": "/acts"}, {"heldout_fvu": 0.1, "l0": 8.0}),
    ])
    assert "SAEs of this stream: the L0–FVU frontier" in page
    table = page.split('id="frontier"')[1]
    assert "n64-k4" in table and "n64-k16" in table
    assert not any(name in table for name in ("other-length", "other-data", "a-capture"))
    assert "8,192 tokens" in table, "the held-out FVU's sample size"
    assert "0.3000" in table and "4,096 tokens" in table and "0.900" in table, \
        "the evaluated SAE's figures with their sample size"


def test_a_capture_frontier_is_unchanged_and_a_lone_sae_has_none(tmp_path) -> None:
    page = _page(tmp_path, [("a", {"activations": "/acts"}, {"heldout_fvu": 0.2, "l0": 8.0}),
                            ("b", {"activations": "/acts"}, {"heldout_fvu": 0.3, "l0": 4.0}),
                            ("s", _stream_cfg(600), {"heldout_fvu": 0.1, "l0": 2.0})])
    assert "SAEs of this capture: the L0–FVU frontier" in page
    assert "s</a>" not in page.split('id="frontier"')[1]
    lone = tmp_path / "lone"
    lone.mkdir()
    alone = _page(lone, [("s", _stream_cfg(600), {"heldout_fvu": 0.1, "l0": 2.0})])
    assert 'data-plot="frontier"' not in alone
