"""Rows of the store as plain JSON-able dicts: what the CLI's ``--json`` and the web API
print, so both always agree on field names."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.store.example_pack import StoredExample
from app.store.models import Explanation, Job, Latent, Sae


def _when(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def sae_record(sae: Sae) -> dict[str, Any]:
    return {"id": sae.id, "name": sae.name, "model": sae.model.name, "layer": sae.layer,
            "d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k,
            "architecture": sae.architecture, "site": (sae.config or {}).get("site", "resid"),
            "skip": bool((sae.config or {}).get("skip")), "analysed_tokens": sae.analysed_tokens,
            "dead_share": sae.dead_share,
            "path": sae.path, "metrics": sae.metrics, "created_at": _when(sae.created_at)}


def latent_record(latent: Latent) -> dict[str, Any]:
    return {"index": latent.index, "density": latent.density,
            "mean_activation": latent.mean_activation,
            "max_activation": latent.max_activation, "explanation": latent.explanation,
            "histogram": latent.histogram, "top_logits": latent.top_logits,
            "bottom_logits": latent.bottom_logits, "neighbours": latent.neighbours,
            "sink": latent.sink, "sink_reason": latent.sink_reason,
            "steerability": latent.steerability, "steer_eval": latent.steer_eval,
            "cofiring": latent.cofiring,
            "map": None if latent.map_x is None else [latent.map_x, latent.map_y]}


def example_record(example: StoredExample) -> dict[str, Any]:
    return {"kind": example.kind, "bucket": example.bucket, "rank": example.rank,
            "tokens": example.tokens, "activations": example.activations,
            "context_index": example.context_index, "position": example.position}


def explanation_record(explanation: Explanation) -> dict[str, Any]:
    return {"text": explanation.text, "source": explanation.source,
            "score": explanation.score, "detection_score": explanation.detection_score,
            "fuzzing_score": explanation.fuzzing_score,
            "simulation_score": explanation.simulation_score,
            "detection_n": explanation.detection_n, "fuzzing_n": explanation.fuzzing_n,
            "simulation_n": explanation.simulation_n, "usage": explanation.usage,
            "created_at": _when(explanation.created_at)}


def job_record(job: Job) -> dict[str, Any]:
    """A job row (what ``jobs show --json`` and ``/api/v1/jobs/{id}`` print)."""
    return {"id": job.id, "kind": job.kind, "state": job.state, "stage": job.stage,
            "progress": job.progress, "message": job.message, "params": job.params,
            "stats": job.stats, "result": job.result, "series": job.series,
            "attempts": job.attempts, "worker": job.worker, "log": job.log,
            "created_at": _when(job.created_at), "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at), "heartbeat_at": _when(job.heartbeat_at)}
