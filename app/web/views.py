"""What pages and the JSON API show, built from the store (shared so they agree)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from app.jobs import BrokerUnavailable, JobError, JobFinished, JobNotFound
from app.store.example_pack import ExamplePack
from app.store.models import Explanation, Job, Latent, Model, Sae
from app.web.engine import SaeHandle

CURVE_POINTS = 500


def sae_or_404(session: Session, sae_id: int) -> Sae:
    """The SAE row with its model loaded (pages read ``sae.model`` after routes close the
    session to wait for the engine)."""
    sae = session.get(Sae, sae_id, options=[joinedload(Sae.model)])
    if sae is None:
        raise HTTPException(404, f"there is no SAE {sae_id}")
    return sae


def latent_or_404(session: Session, sae: Sae, index: int, *, examples: bool = True
                  ) -> Latent:
    from app.store.queries import get_latent

    latent = get_latent(session, sae.id, index, examples=examples)
    if latent is None:
        raise HTTPException(404, f"SAE {sae.id} has no latent {index} (it has "
                                 f"{sae.n_latents}: 0 to {sae.n_latents - 1})")
    return latent


def feature_or_404(session: Session, sae_id: int, index: int
                   ) -> tuple[Sae, Latent, ExamplePack]:
    """The SAE (without its model), its latent ``index`` (without its examples) and the
    latent's packed examples, in one query; 404 names what is missing."""
    from app.store.queries import example_pack, latent_with_sae

    found = latent_with_sae(session, sae_id, index)
    if found is None:  # which one is missing (the slow path only a 404 takes)
        sae = sae_or_404(session, sae_id)
        latent = latent_or_404(session, sae, index, examples=False)
        return sae, latent, example_pack(session, latent.id)
    return found.sae, found.latent, found.examples


def job_or_404(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"there is no job {job_id}")
    return job


def job_error(exc: JobError) -> HTTPException:
    """The HTTP answer to a job that cannot be queued or changed (bad params: 422)."""
    status = {JobNotFound: 404, JobFinished: 409, BrokerUnavailable: 503}.get(type(exc), 422)
    return HTTPException(status, str(exc))


def handle(sae: Sae) -> SaeHandle:
    return SaeHandle(id=sae.id, path=sae.path, model=sae.model.name, layer=sae.layer,
                     n_latents=sae.n_latents)


def headline(sae: Sae) -> dict[str, float | None]:
    """Explained variance, L0 and CE loss recovered from the evaluation with the SAE spliced
    into the model when there is one, else from training; the dead share from the analysis
    (latents that never fired over its ``analysed_tokens``), never from a few thousand
    evaluation tokens."""
    metrics = sae.metrics or {}
    evaluated = metrics.get("eval") or {}
    fvu = evaluated.get("fvu", metrics.get("heldout_fvu", metrics.get("fvu")))
    return {"explained_variance": None if fvu is None else 1 - fvu,
            "l0": evaluated.get("l0", metrics.get("l0")),
            "dead_share": sae.dead_share, "analysed_tokens": sae.analysed_tokens,
            "eval_tokens": evaluated.get("tokens"),
            "ce_loss_recovered": evaluated.get("ce_loss_recovered")}


def training_source(config: dict | None) -> tuple | None:
    """What an SAE was trained and held out on, so SAEs sharing it are comparable: its
    capture's folder, or, trained straight from the model, the dataset, context, held-out
    rows (the stream's first) and contexts read (evaluation starts after them), which the
    members of one streaming sweep share; None when unknown (an imported SAE)."""
    config = config or {}
    if config.get("activations"):
        return ("capture", config["activations"])
    if config.get("streamed") and config.get("dataset"):
        return ("stream", config["dataset"], config.get("context_size"),
                (config.get("train") or {}).get("holdout_rows"), config.get("stream_contexts"))
    return None


def frontier(session: Session, sae: Sae) -> list[dict[str, Any]]:
    """The SAEs trained on the same capture or stream as ``sae`` (a sweep, or runs compared
    by hand), each with its L0, FVU, CE loss recovered and the tokens they were measured
    on, by L0; empty when it has no sibling."""
    source = training_source(sae.config)
    if source is None:
        return []
    siblings = session.scalars(select(Sae).where(Sae.model_id == sae.model_id,
                                                 Sae.layer == sae.layer)).all()
    points = []
    for other in siblings:
        if training_source(other.config) != source:
            continue
        figures = headline(other)
        if figures["explained_variance"] is None or figures["l0"] is None:
            continue
        points.append({"id": other.id, "name": other.name, "l0": figures["l0"],
                       "fvu": 1 - figures["explained_variance"],
                       "fvu_tokens": figures["eval_tokens"] or (other.metrics or {}).get(
                           "heldout_rows"),
                       "ce_loss_recovered": figures["ce_loss_recovered"],
                       "ce_tokens": figures["eval_tokens"],
                       "current": other.id == sae.id})
    return sorted(points, key=lambda p: p["l0"]) if len(points) > 1 else []


def models_overview(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(select(Model, func.count(Sae.id)).outerjoin(Sae)
                           .group_by(Model.id).order_by(Model.name))
    return [{"name": m.name, "d_model": m.d_model, "n_layers": m.n_layers, "saes": count}
            for m, count in rows]


def loss_curve(sae: Sae) -> dict[str, list[float]]:
    """Training FVU by step from the SAE folder's ``loss_curve.csv`` (thinned to
    ``CURVE_POINTS``); empty when the folder is not on this machine."""
    path = Path(sae.path) / "loss_curve.csv"
    if not path.is_file():
        return {"step": [], "fvu": []}
    with path.open(newline="") as handle_:
        rows = list(csv.DictReader(handle_))
    every = max(1, len(rows) // CURVE_POINTS)
    rows = rows[::every]
    return {"step": [int(r["step"]) for r in rows], "fvu": [float(r["fvu"]) for r in rows]}


def density_histogram(session: Session, sae_id: int, bins: int = 40) -> dict[str, Any]:
    """Counts of latents by log10 density (the dead ones, density 0, counted apart)."""
    densities = session.scalars(select(Latent.density).where(Latent.sae_id == sae_id)).all()
    logs = [math.log10(d) for d in densities if d > 0]
    dead = len(densities) - len(logs)
    if not logs:
        return {"centers": [], "counts": [], "dead": dead}
    low, high = min(logs), max(logs) + 1e-9
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in logs:
        counts[min(bins - 1, int((value - low) / width))] += 1
    return {"centers": [low + (i + 0.5) * width for i in range(bins)], "counts": counts,
            "dead": dead}


def best_explanation(session: Session, latent: Latent) -> Explanation | None:
    """The latent's highest-scoring explanation (newest when unscored)."""
    if not latent.explanation:  # every explanation also sets the latent's copy
        return None
    stmt = (select(Explanation).where(Explanation.latent_id == latent.id)
            .order_by(Explanation.score.desc().nulls_last(), Explanation.id.desc()).limit(1))
    return session.scalars(stmt).first()


def example_groups(pack: ExamplePack) -> dict[str, Any]:
    """What the feature page shows at once: the top examples and the highest quantile
    bucket's samples (``open``: bucket, examples, lowest and highest peak), and the other
    buckets with their sample counts (``closed``: loaded when their section is
    opened)."""
    counts = pack.bucket_counts()
    first = max(counts) if counts else None
    shown = pack.examples(buckets=() if first is None else (first,))
    top = [e for e in shown if e.kind == "top"]
    items = [e for e in shown if e.kind == "quantile"]
    peaks = [max(e.activations) for e in items if e.activations] or [0.0]
    return {"top": top, "open": (first, items, min(peaks), max(peaks)) if items else None,
            "closed": sorted(((b, n) for b, n in counts.items() if b != first), reverse=True)}


def latent_maxima(session: Session, sae_id: int, indices: list[int]) -> dict[int, float]:
    """Max activation of each latent (steering's unit); 404 names the unknown ones."""
    rows = dict(session.execute(select(Latent.index, Latent.max_activation).where(
        Latent.sae_id == sae_id, Latent.index.in_(indices))).all())
    missing = sorted(set(indices) - set(rows))
    if missing:
        raise HTTPException(422, f"features: SAE {sae_id} has no latent "
                                 f"{', '.join(map(str, missing))}")
    return {index: float(value) or 1.0 for index, value in rows.items()}


def ranked_probe(session: Session, sae_id: int, result: Any, *, by: str = "relative",
                 sinks_last: bool = True, limit: int = 20) -> list:
    """The top latents of a probe result ranked against each latent's own max over the
    analysed tokens (sinks last unless ``sinks_last`` is False); a short read of the
    firing latents' max and sink flag."""
    fired = result.fired_features()
    rows = session.execute(select(Latent.index, Latent.max_activation, Latent.sink).where(
        Latent.sae_id == sae_id, Latent.index.in_(fired))).all() if fired else []
    maxima = {index: float(peak) for index, peak, _ in rows}
    sinks = {index for index, _, sink in rows if sink}
    return result.ranked_features(maxima, sinks, by=by, sinks_last=sinks_last, limit=limit)


def top_snippets(session: Session, latents: list[Latent]) -> dict[int, tuple[list, list]]:
    """Each listed latent's strongest example (tokens, activations), by latent row id: one
    query for the page, for the latent list's snippet column."""
    from app.store.queries import top_examples

    found = top_examples(session, [lat.id for lat in latents])
    return {latent_id: (ex.tokens, ex.activations) for latent_id, ex in found.items()}
