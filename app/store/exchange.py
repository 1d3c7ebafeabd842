"""Export and import an SAE's features as Neuronpedia-style JSON.

One file per SAE: ``{"format": "neuronpedia-features", "version": 1, "modelId", "layer",
"sae": {...}, "features": [...]}``. Each feature uses Neuronpedia's field names
(``index``, ``maxActApprox``, ``frac_nonzero``, ``pos_str``/``pos_values``,
``neg_str``/``neg_values``, ``freq_hist_data_bar_heights``/``_values``,
``topkCosSimIndices``/``Values``, ``activations`` with ``tokens``/``values``/``maxValue``/
``maxValueTokenIndex``, ``explanations`` with ``description``), so a file can be read by
tools that know that format; what Neuronpedia has no field for (the mean activation, an
example's kind, quantile bucket and source position) rides along under extra keys that
such tools ignore, so an export/import round trip loses nothing.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.store.example_pack import PackError, StoredExample, pack_records
from app.store.models import Explanation, Latent, LatentExamples, Model, Sae

FORMAT = "neuronpedia-features"
VERSION = 1


class ExchangeError(ValueError):
    """A file that is not a saelab/Neuronpedia feature export; the message says why."""


def export_sae(session: Session, sae_id: int) -> dict[str, Any]:
    """The whole analysis of SAE ``sae_id`` as one JSON-able dict."""
    sae = session.get(Sae, sae_id)
    if sae is None:
        raise ValueError(f"no SAE with id {sae_id} in the store (see `saelab saes`)")
    latents = session.scalars(
        select(Latent).where(Latent.sae_id == sae_id).order_by(Latent.index)
        .options(selectinload(Latent.example_pack))).all()
    explanations = _explanations(session, [lat.id for lat in latents])
    return {
        "format": FORMAT, "version": VERSION, "modelId": sae.model.name, "layer": sae.layer,
        "sae": {"name": sae.name, "path": sae.path, "architecture": sae.architecture,
                "d_in": sae.d_in, "d_model": sae.model.d_model,
                "n_layers": sae.model.n_layers, "n_latents": sae.n_latents, "k": sae.k,
                "config": sae.config, "metrics": sae.metrics,
                "analysed_tokens": sae.analysed_tokens},
        "features": [_feature(lat, explanations.get(lat.id, [])) for lat in latents],
    }


def _explanations(session: Session, latent_ids: list[int]) -> dict[int, list[Explanation]]:
    found: dict[int, list[Explanation]] = {}
    rows = session.scalars(select(Explanation).where(Explanation.latent_id.in_(latent_ids))
                           .order_by(Explanation.id)) if latent_ids else []
    for row in rows:
        found.setdefault(row.latent_id, []).append(row)
    return found


def _feature(lat: Latent, explanations: list[Explanation]) -> dict[str, Any]:
    hist = lat.histogram or {}
    edges = hist.get("edges", [])
    return {
        "index": lat.index, "maxActApprox": lat.max_activation, "frac_nonzero": lat.density,
        "meanActivation": lat.mean_activation,
        "pos_str": [t for t, _ in lat.top_logits], "pos_values": [v for _, v in lat.top_logits],
        "neg_str": [t for t, _ in lat.bottom_logits],
        "neg_values": [v for _, v in lat.bottom_logits],
        "freq_hist_data_bar_heights": hist.get("counts", []),
        "freq_hist_data_bar_values": [
            (lo * hi) ** 0.5 for lo, hi in itertools.pairwise(edges)],
        "histogramEdges": edges,
        "topkCosSimIndices": [i for i, _ in lat.neighbours],
        "topkCosSimValues": [c for _, c in lat.neighbours],
        "activations": [_activation(ex, lat.max_activation) for ex in lat.examples],
        "explanations": [{"description": e.text, "explanationModelName": e.source,
                          "score": e.score, "current": e.text == lat.explanation}
                         for e in explanations],
    }


def _activation(ex: StoredExample, max_act: float) -> dict[str, Any]:
    peak = max(range(len(ex.activations)), key=ex.activations.__getitem__, default=0)
    record = {"tokens": ex.tokens, "values": ex.activations,
              "maxValue": ex.activations[peak] if ex.activations else 0.0,
              "maxValueTokenIndex": peak, "kind": ex.kind, "rank": ex.rank,
              "bucket": ex.bucket, "contextIndex": ex.context_index, "position": ex.position}
    if ex.kind == "quantile" and ex.bucket is not None:
        record["binMin"], record["binMax"] = ex.bucket * max_act / 10, (ex.bucket + 1) * (
            max_act / 10)
    return record


def import_sae(sessions: sessionmaker[Session], data: Any, *, path: str | None = None) -> int:
    """Write an export into the store in one transaction, replacing the features of an SAE
    with the same path; returns the SAE's id. ``path`` overrides the exported SAE path
    (the key that makes an SAE unique)."""
    meta, features = _validated(data)
    with sessions.begin() as session:
        model = _model(session, data["modelId"], meta)
        sae_path = path or meta.get("path") or f"import:{data['modelId']}:{meta['name']}"
        sae = session.scalars(select(Sae).where(Sae.path == sae_path)).one_or_none()
        if sae is None:
            sae = Sae(path=sae_path, model=model)
            session.add(sae)
        elif sae.model_id != model.id:
            raise ExchangeError(f"the store's SAE at {sae_path} belongs to another model")
        _fill_sae(sae, meta, int(data["layer"]), len(features))
        session.flush()
        session.execute(delete(Latent).where(Latent.sae_id == sae.id))
        _insert(session, sae.id, features)
        return sae.id


def _validated(data: Any) -> tuple[dict, list[dict]]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExchangeError(f"not a feature export: expected \"format\": \"{FORMAT}\"")
    if data.get("version") != VERSION:
        raise ExchangeError(f"export version {data.get('version')!r} is not supported "
                           f"(this saelab reads version {VERSION})")
    meta, features = data.get("sae"), data.get("features")
    if not isinstance(meta, dict) or not isinstance(features, list):
        raise ExchangeError("an export needs an \"sae\" object and a \"features\" list")
    for key in ("name", "architecture", "d_in", "n_latents"):
        if key not in meta:
            raise ExchangeError(f"the export's \"sae\" lacks \"{key}\"")
    if "modelId" not in data or "layer" not in data:
        raise ExchangeError("the export lacks \"modelId\" or \"layer\"")
    indices = [f.get("index") if isinstance(f, dict) else None for f in features]
    if any(not isinstance(i, int) or not 0 <= i < int(meta["n_latents"]) for i in indices):
        raise ExchangeError(f"every feature needs an integer \"index\" in [0, "
                           f"{meta['n_latents']})")
    if len(set(indices)) != len(indices):
        raise ExchangeError("the export repeats a feature index")
    return meta, features


def _model(session: Session, name: str, meta: dict) -> Model:
    model = session.scalars(select(Model).where(Model.name == name)).one_or_none()
    if model is None:
        model = Model(name=name, d_model=int(meta.get("d_model", meta["d_in"])),
                      n_layers=meta.get("n_layers"))
        session.add(model)
        session.flush()
    return model


def _fill_sae(sae: Sae, meta: dict, layer: int, count: int) -> None:
    sae.name, sae.architecture, sae.layer = str(meta["name"]), str(meta["architecture"]), layer
    sae.d_in, sae.n_latents = int(meta["d_in"]), int(meta["n_latents"])
    sae.k = int(meta["k"]) if meta.get("k") else None
    sae.config, sae.metrics = meta.get("config") or {}, meta.get("metrics") or {}
    sae.analysed_tokens = meta.get("analysed_tokens")


def _insert(session: Session, sae_id: int, features: list[dict]) -> None:
    rows = [_latent_row(sae_id, f) for f in features]
    if not rows:
        return
    session.execute(insert(Latent.__table__), rows)
    ids = dict(session.execute(select(Latent.index, Latent.id)
                               .where(Latent.sae_id == sae_id)).all())
    packs, explanations = [], []
    for f in features:
        latent_id = ids[f["index"]]
        records = [_example(rank, a) for rank, a in enumerate(f.get("activations") or [])]
        if records:
            packs.append({"latent_id": latent_id, "count": len(records),
                          "data": _pack(records)})
        explanations += [{"latent_id": latent_id, "text": str(e["description"]),
                          "source": str(e.get("explanationModelName") or "import"),
                          "score": e.get("score")}
                         for e in f.get("explanations") or [] if e.get("description")]
    if packs:
        session.execute(insert(LatentExamples.__table__), packs)
    if explanations:
        session.execute(insert(Explanation.__table__), explanations)


def _latent_row(sae_id: int, f: dict) -> dict[str, Any]:
    current = [e["description"] for e in f.get("explanations") or []
               if e.get("current") or len(f["explanations"]) == 1]
    return {
        "sae_id": sae_id, "index": f["index"], "density": float(f.get("frac_nonzero", 0.0)),
        "mean_activation": float(f.get("meanActivation", 0.0)),
        "max_activation": float(f.get("maxActApprox", 0.0)),
        "histogram": {"edges": f.get("histogramEdges", []),
                      "counts": f.get("freq_hist_data_bar_heights", [])},
        "top_logits": [list(p) for p in zip(f.get("pos_str", []), f.get("pos_values", []),
                                            strict=False)],
        "bottom_logits": [list(p) for p in zip(f.get("neg_str", []), f.get("neg_values", []),
                                               strict=False)],
        "neighbours": [list(p) for p in zip(f.get("topkCosSimIndices", []),
                                            f.get("topkCosSimValues", []), strict=False)],
        "explanation": current[0] if current else None,
    }


def _example(rank: int, a: dict) -> StoredExample:
    tokens, values = list(a.get("tokens", [])), [float(v) for v in a.get("values", [])]
    if len(tokens) != len(values):
        raise ExchangeError(f"an activation record has {len(tokens)} tokens but "
                           f"{len(values)} values")
    kind = a.get("kind", "top")
    return StoredExample(kind, a.get("bucket") if kind == "quantile" else None,
                         a.get("rank", rank), [str(t) for t in tokens], values,
                         a.get("contextIndex", -1),
                         a.get("position", a.get("maxValueTokenIndex", 0)))


def _pack(records: list[StoredExample]) -> bytes:
    try:
        return pack_records(records)
    except (PackError, TypeError, ValueError) as exc:
        raise ExchangeError(f"an activation record cannot be stored: {exc}") from exc


def read_export(path: Path) -> Any:
    """The parsed JSON of an export file."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ExchangeError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ExchangeError(f"{path} is not JSON: {exc}") from exc
