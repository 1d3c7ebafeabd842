"""The steer_eval stage: measure how well clamping each chosen latent steers the model's
replies (``training.inference.steer_eval``) and store the figures on the latents."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.jobs import JobParams, parse_latents
from app.settings import Settings
from app.store import steer_evals as store
from app.store.models import Sae
from worker.runtime import JobRun


def parse_strengths(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def steer_eval_stage(run: JobRun, params: JobParams, settings: Settings, sae_id: int,
                     count: int | None = None) -> dict[str, Any]:
    """Steer-eval the SAE's chosen latents (``count``: the most active non-sink ones, else
    ``params.latent_range``); returns {"latents", "steerable", "mean_steerability",
    "prompts", "strengths"}."""
    from training.data.models import load_model
    from training.inference.steer_eval import NEUTRAL_PROMPTS, SteerEvalConfig, steer_eval
    from training.sae.folder import load_sae

    with run.sessions() as session:
        sae = session.get(Sae, sae_id)
        if sae is None:
            raise ValueError(f"sae_id: there is no SAE {sae_id} in the store")
        chosen = (store.most_active_non_sink(session, sae_id, count) if count
                  else parse_latents(params.latent_range, sae.n_latents))
        maxima = store.maxima_of(session, sae_id, chosen)
        model_name, path, layer = sae.model.name, sae.path, sae.layer
    latents = [i for i in chosen if i in maxima]  # a latent that never fired cannot steer
    cfg = SteerEvalConfig(prompts=tuple(params.prompts or NEUTRAL_PROMPTS),
                          strengths=parse_strengths(params.strengths))
    lm = load_model(model_name, data_dir=settings.data_dir)
    module, _ = load_sae(Path(path), lm.device)
    run.update(force=True, message=f"steering {len(latents)} latents on {len(cfg.prompts)} "
                                   f"prompts at strengths {params.strengths}")
    records = [asdict(r) for r in steer_eval(
        lm, module.eval(), layer, latents, maxima, cfg,
        on_prompt=lambda done, total: run.progress(done, total))]
    store.save_steer_eval(run.sessions, sae_id, records)
    scores = [r["steerability"] for r in records]
    return {"latents": len(records), "steerable": sum(s > 0 for s in scores),
            "mean_steerability": sum(scores) / len(scores) if scores else None,
            "prompts": len(cfg.prompts), "strengths": list(cfg.strengths),
            "skipped_never_fired": len(chosen) - len(latents)}
