"""Writing an SAE and its analysis into the store, in bulk and in one transaction.

A re-run updates the SAE's latent rows in place and replaces their examples inside one
transaction, so readers see either the old analysis or the new one and a crash half-way
leaves the old one intact. What belongs to a latent of the SAE rather than to one analysis
(its explanations, their scores, its steerability) stays: only latents beyond a new, smaller
width are deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.store.bulk import insert_examples
from app.store.models import Latent, LatentExamples, Model, Sae
from training.analysis.histogram import histograms_of
from training.analysis.sinks import sink_reason

EVAL_FILE = "eval.json"
"""Written into an SAE folder by ``saelab demo``/the analyze stage: its metrics spliced into
the model (CE loss recovered, KL, ...)."""


def save_analysis(sessions: sessionmaker[Session], *, sae_dir: Path, sae_cfg: dict,
                  model_name: str, d_model: int, n_layers: int, result: Any,
                  token_text: dict[int, str]) -> int:
    """Persist ``result`` (a ``training.analysis.latents.AnalysisResult``) for the SAE folder
    ``sae_dir``; returns the SAE's id. ``token_text`` maps every token id in the
    examples and logit lists to its text."""
    with sessions.begin() as session:
        model = _model(session, model_name, d_model, n_layers)
        sae = _sae(session, model, Path(sae_dir), sae_cfg, result)
        ids = _upsert_latents(session, sae.id, result, token_text)
        session.execute(delete(LatentExamples).where(LatentExamples.latent_id.in_(
            select(Latent.id).where(Latent.sae_id == sae.id))))
        insert_examples(session, ids, result.examples, token_text)
        return sae.id


def _model(session: Session, name: str, d_model: int, n_layers: int) -> Model:
    model = session.scalars(select(Model).where(Model.name == name)).one_or_none()
    if model is None:
        model = Model(name=name, d_model=d_model, n_layers=n_layers)
        session.add(model)
        session.flush()
    return model


def _sae(session: Session, model: Model, sae_dir: Path, cfg: dict, result: Any) -> Sae:
    path = str(sae_dir.resolve())
    sae = session.scalars(select(Sae).where(Sae.path == path)).one_or_none()
    if sae is None:
        sae = Sae(path=path, model=model)
        session.add(sae)
    metrics_file = sae_dir / "metrics.json"
    sae.name = display_name(sae_dir, cfg)
    sae.architecture = str(cfg["architecture"])
    sae.layer = int(cfg["hook_layer"])
    sae.d_in = int(cfg["d_in"])
    sae.n_latents = int(cfg["d_sae"])
    sae.k = int(cfg["k"]) if cfg.get("k") else None
    sae.config = {key: value for key, value in cfg.items() if _jsonable(value)}
    sae.metrics = _read_json(metrics_file)
    evaluated = _read_json(sae_dir / EVAL_FILE)  # spliced-in metrics, when evaluated
    if evaluated:
        sae.metrics["eval"] = evaluated
    sae.analysed_tokens = result.tokens
    sae.metrics["cofiring_tokens"] = result.cofiring.tokens
    sae.dead_share = float((result.density == 0).double().mean())
    session.flush()
    return sae


def _latent_rows(sae_id: int, result: Any, token_text: dict[int, str]) -> list[dict]:
    """The analysed columns of every latent (not its explanation or steerability); every
    tensor is rounded and converted to lists once, for all latents."""
    def pairs(ids, values) -> list[list[list]]:
        return [[[token_text.get(i, ""), v] for i, v in zip(row_ids, row_values, strict=True)]
                for row_ids, row_values in zip(ids.tolist(), _rounded(values, 5), strict=True)]

    sinks, cofire = result.sinks, result.cofiring
    histograms = histograms_of(result.histogram_scale.double().numpy(),
                               result.histogram_counts.numpy())
    tops = pairs(result.top_logit_ids, result.top_logits)
    bottoms = pairs(result.bottom_logit_ids, result.bottom_logits)
    neighbours = [[[i, c] for i, c in zip(ids, cosines, strict=True)] for ids, cosines in zip(
        result.neighbour_ids.tolist(), _rounded(result.neighbour_cosines, 4), strict=True)]
    cofiring = [[[j, jac, cond] for j, jac, cond in zip(ids, jacs, conds, strict=True) if j >= 0]
                for ids, jacs, conds in zip(cofire.ids.tolist(), _rounded(cofire.jaccard, 4),
                                            _rounded(cofire.conditional, 4), strict=True)]
    sink = sinks.sink.tolist()
    return [{
        "sae_id": sae_id, "index": f, "density": density, "mean_activation": mean,
        "max_activation": peak, "histogram": histograms[f], "top_logits": tops[f],
        "bottom_logits": bottoms[f], "neighbours": neighbours[f], "sink": sink[f],
        "sink_reason": sink_reason(sinks, f) if sink[f] else None, "cofiring": cofiring[f],
    } for f, (density, mean, peak) in enumerate(zip(
        result.density.double().tolist(), result.mean_activation.double().tolist(),
        result.max_activation.double().tolist(), strict=True))]


def _rounded(values: Any, digits: int) -> list[list[float]]:
    return np.round(values.double().numpy(), digits).tolist()


def _upsert_latents(session: Session, sae_id: int, result: Any,
                    token_text: dict[int, str]) -> list[int]:
    """Update the SAE's existing latent rows, insert missing ones and delete those past
    the analysed width; returns the row id of each latent index."""
    rows = _latent_rows(sae_id, result, token_text)
    existing = dict(session.execute(select(Latent.index, Latent.id).where(
        Latent.sae_id == sae_id)).all())
    session.execute(delete(Latent).where(Latent.sae_id == sae_id,
                                         Latent.index >= len(rows)))
    updates = [{"id": existing[r["index"]], **r} for r in rows if r["index"] in existing]
    if updates:  # ORM bulk UPDATE by primary key: one executemany
        session.execute(update(Latent), updates)
    inserts = [r for r in rows if r["index"] not in existing]
    if inserts:  # Core executemany: no per-row ORM work
        session.execute(insert(Latent.__table__), inserts)
    found = session.execute(select(Latent.index, Latent.id).where(Latent.sae_id == sae_id))
    ids = {index: latent_id for index, latent_id in found.all()}
    return [ids[f] for f in range(len(rows))]


def save_feature_map(sessions: sessionmaker[Session], sae_id: int, positions: Any) -> None:
    """Store each latent's feature-map position (``positions`` [n, 2], latent order)."""
    with sessions.begin() as session:
        ids = dict(session.execute(select(Latent.index, Latent.id).where(
            Latent.sae_id == sae_id)).all())
        rows = [{"id": ids[f], "map_x": float(x), "map_y": float(y)}
                for f, (x, y) in enumerate(positions.tolist()) if f in ids]
        if rows:
            session.execute(update(Latent), rows)


def display_name(sae_dir: Path, cfg: dict) -> str:
    """The SAE folder's name; a job's SAE (``jobs/<id>/sae``) is named after the job and
    its shape instead, e.g. ``job7-L6-n4096-k32``."""
    sae_dir = Path(sae_dir)
    if sae_dir.name != "sae" or not sae_dir.parent.name.isdecimal():
        return sae_dir.name
    k = f"-k{cfg['k']}" if cfg.get("k") else ""
    return f"job{sae_dir.parent.name}-L{cfg['hook_layer']}-n{cfg['d_sae']}{k}"


def token_texts(tokenizer: Any, result: Any) -> dict[int, str]:
    """Text of every token id the analysis ``result`` refers to."""
    ids = set(result.top_logit_ids.unique().tolist()) | set(
        result.bottom_logit_ids.unique().tolist()) | result.examples.token_ids()
    return {i: tokenizer.decode([i]) for i in ids}


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict | type(None))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
