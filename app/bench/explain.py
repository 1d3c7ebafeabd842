"""Automated interpretability throughput and quality: one explain job run in process,
then the distribution of the scores it stored."""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import func, select

from app.settings import Settings


def bench_explain(settings: Settings, sae_id: int, latents: str, explainer: str
                  ) -> dict[str, Any]:
    """Run ``saelab explain --now`` on ``latents`` and summarise what it stored."""
    from app import jobs
    from app.store.db import open_store
    from app.store.models import Explanation, Job, Latent
    from worker.tasks import run_job

    sessions = open_store(settings.database_url)
    job = jobs.create(sessions, "explain", {"sae_id": sae_id, "explainer": explainer,
                                            **({"latent_range": latents} if latents != "all"
                                               else {})})
    run_job(job.id, sessions)
    with sessions() as session:
        job = session.get(Job, job.id)
        if job.state != "succeeded":
            raise ValueError(f"the explain job {job.state}: {job.message}")
        summary = job.result["explain"]
        rows = session.execute(select(Explanation).join(Latent).where(
            Latent.sae_id == sae_id, Explanation.created_at >= job.started_at)).scalars().all()
        explained_any = session.scalar(select(func.count(func.distinct(Latent.id))).join(
            Explanation, Explanation.latent_id == Latent.id).where(Latent.sae_id == sae_id))
        n_latents = session.scalar(select(func.count()).where(Latent.sae_id == sae_id))
        seconds = (job.finished_at - job.started_at).total_seconds()
    return {"bench": "explain", "sae_id": sae_id, "explainer": explainer, "latents": latents,
            "explained": summary["explained"], "skipped": summary["skipped"],
            "failed": len(summary["failed"]), "seconds": seconds,
            "latents_per_min": summary["explained"] / seconds * 60 if seconds else None,
            "usage": summary["usage"],
            "detection": _distribution([r.detection_score for r in rows]),
            "fuzzing": _distribution([r.fuzzing_score for r in rows]),
            "simulation": _distribution([r.simulation_score for r in rows]),
            "questions_per_detection_score": _distribution(
                [r.detection_n for r in rows if r.detection_score is not None]),
            "fraction_explained": explained_any / n_latents if n_latents else 0.0}


def _distribution(values: list[float | None]) -> dict[str, Any]:
    """Count, unscored count, mean and quartiles of some scores."""
    scored = sorted(v for v in values if v is not None)
    if not scored:
        return {"scored": 0, "unscored": len(values)}
    quartiles = statistics.quantiles(scored, n=4) if len(scored) > 1 else [scored[0]] * 3
    return {"scored": len(scored), "unscored": len(values) - len(scored),
            "mean": statistics.fmean(scored), "min": scored[0], "q1": quartiles[0],
            "median": quartiles[1], "q3": quartiles[2], "max": scored[-1],
            "above_chance": sum(v > 0.5 for v in scored) / len(scored)}


def bench_steer_eval(settings: Settings, sae_id: int, count: int, strengths: str
                     ) -> dict[str, Any]:
    """Run a steer_eval job here on the SAE's ``count`` most active non-sink latents and
    summarise its speed and the steerability it measured."""
    from app import jobs
    from app.store.db import open_store
    from app.store.models import Job, Latent
    from app.store.steer_evals import most_active_non_sink
    from worker.tasks import run_job

    sessions = open_store(settings.database_url)
    with sessions() as session:
        chosen = most_active_non_sink(session, sae_id, count)
    job = jobs.create(sessions, "steer_eval", {"sae_id": sae_id, "strengths": strengths,
                                               "latent_range": ",".join(map(str, chosen))})
    run_job(job.id, sessions)
    with sessions() as session:
        job = session.get(Job, job.id)
        if job.state != "succeeded":
            raise ValueError(f"the steer_eval job {job.state}: {job.message}")
        records = [lat.steer_eval for lat in session.scalars(select(Latent).where(
            Latent.sae_id == sae_id, Latent.index.in_(chosen)))]
        seconds = (job.finished_at - job.started_at).total_seconds()
    best = [r["best_strength"] for r in records if r["best_strength"] is not None]
    return {"bench": "steer_eval", "sae_id": sae_id, "latents": len(records),
            "prompts": records[0]["prompts"] if records else 0, "strengths": strengths,
            "seconds": seconds, "latents_per_min": len(records) / seconds * 60,
            "steerability": _distribution([r["steerability"] for r in records]),
            "steerable": sum(r["steerability"] > 0 for r in records),
            "best_strengths": {str(s): best.count(s) for s in sorted(set(best))}}
