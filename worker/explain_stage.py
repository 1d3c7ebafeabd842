"""The explain stage: label latents with Claude or the local model, score the labels on
held-out contexts, store them (with their usage) and embed them for semantic search.

Idempotent: latents already explained with the same settings key are skipped, so a
resumed or repeated job only does what is missing. A latent whose requests fail after
retries (rate limits, overload, exhausted credit) is reported in the job's result with the
error, never stored with a score.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

from app.jobs import JobParams, parse_latents
from app.settings import Settings
from app.store import explanations as store
from app.store.models import Sae
from worker.runtime import JobRun

NEGATIVES = 10
"""Non-activating windows offered to detection scoring per latent."""
BATCH_FROM = 200
"""Claude runs of at least this many latents go through the Message Batches API (half
the price, no rate limits to pace; results come when the batch ends)."""
BATCH_CHUNK = 500
"""Latents per message batch: each chunk is stored before the next one is sent."""


def make_explainer(params: JobParams, settings: Settings, model_name: str):
    """Claude when asked for (or ``auto`` with an API key), else the local model."""
    from training.autointerp.claude import ClaudeExplainer
    from training.autointerp.local import LocalExplainer

    kind = params.explainer
    if kind == "auto":
        kind = "claude" if settings.anthropic_api_key else "local"
    if kind == "claude":
        if not settings.anthropic_api_key:
            raise ValueError("explainer: claude needs ANTHROPIC_API_KEY (or "
                             "SAELAB_ANTHROPIC_API_KEY)")
        return ClaudeExplainer(api_key=settings.anthropic_api_key,
                               model=params.explainer_model or settings.claude_model,
                               base_url=settings.anthropic_base_url or None)
    from training.data.models import load_model

    return LocalExplainer(load_model(model_name, data_dir=settings.data_dir))


def explain_stage(run: JobRun, params: JobParams, settings: Settings, sae_id: int,
                  count: int | None = None) -> dict[str, Any]:
    """Explain the chosen latents of SAE ``sae_id`` (``count``: the most active ones);
    returns {"explained", "skipped", "failed": {index: error}, "usage": totals}."""
    from dataclasses import asdict

    from training.autointerp.explain import ExplainSettings, settings_key

    with run.sessions() as session:
        sae = session.get(Sae, sae_id)
        if sae is None:
            raise ValueError(f"sae_id: there is no SAE {sae_id} in the store")
        model_name, n_latents, sae_path = sae.model.name, sae.n_latents, sae.path
        capture = (sae.config or {}).get("activations")
        indices = (store.most_active(session, sae_id, count) if count
                   else parse_latents(params.latent_range, n_latents))
    explainer = make_explainer(params, settings, model_name)
    key = settings_key(explainer.name, explainer.model, score=params.score,
                       **asdict(ExplainSettings()))
    with run.sessions() as session:
        done = store.explained_with(session, sae_id, key)
    todo = [i for i in indices if i not in done]
    run.update(force=True, message=f"explaining {len(todo)} latents with {explainer.name} "
                                   f"({len(indices) - len(todo)} already done)")
    pool, tokenizer = _negative_pool(sae_path, capture, model_name, settings) if (
        params.score and todo) else (None, None)
    summary = _explain_all(run, explainer, key, sae_id, todo, pool, tokenizer, params.score)
    if todo and not summary["explained"]:
        first = next(iter(summary["failed"].values()))
        raise ValueError(f"no latent could be explained ({len(todo)} tried): {first}")
    summary["skipped"] = len(indices) - len(todo)
    _embed(run, sae_id)
    return summary


def _explain_all(run: JobRun, explainer, key: str, sae_id: int, todo: list[int], pool,
                 tokenizer, score: bool) -> dict[str, Any]:
    """Explain ``todo`` one latent at a time (or in message batches for long Claude runs),
    storing each result as it comes; stops at an error every later latent would hit too
    (a bad key, no credit)."""
    from training.autointerp.explain import explain_latent, explain_latents_batched

    totals = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    failed: dict[str, str] = {}
    batched = hasattr(explainer, "complete_batch") and len(todo) >= BATCH_FROM
    step = BATCH_CHUNK if batched else 1
    started, done = time.monotonic(), 0
    for first in range(0, len(todo), step):
        chunk = todo[first:first + step]
        loaded = [_inputs(run, sae_id, index, pool, tokenizer, score) for index in chunk]
        pairs = [(record, negatives) for record, negatives, _ in loaded]
        results = (explain_latents_batched(pairs, explainer, score=score) if batched else
                   [explain_latent(*pairs[0], explainer, seed=chunk[0], score=score)])
        for (_, _, data), result in zip(loaded, results, strict=True):
            _store(run, explainer, key, data, result, totals, failed)
        done += len(chunk)
        rate = done / max(time.monotonic() - started, 1e-9) * 60
        run.progress(done, len(todo), latents_per_min=rate, cost_usd=totals["cost_usd"],
                     failed=len(failed))
        fatal = next((r for r in results if r.fatal), None)
        if fatal is not None:
            raise ValueError(f"explainer {explainer.name} ({explainer.model}) cannot go on: "
                             f"{'; '.join(fatal.errors)}")
    return {"explained": len(todo) - len(failed), "failed": failed, "usage": totals}


def _inputs(run: JobRun, sae_id: int, index: int, pool, tokenizer, score: bool):
    """(record, negatives, stored data) of one latent."""
    with run.sessions() as session:
        data = store.latent_for_explaining(session, sae_id, index)
    return _record(data), (_negatives(pool, tokenizer, index) if score else []), data


def _store(run: JobRun, explainer, key: str, data: dict, result, totals: dict,
           failed: dict) -> None:
    for name in totals:
        totals[name] += result.usage.get(name, 0)
    if result.label:
        store.save_explanation(run.sessions, data["id"], text=result.label,
                               source=explainer.model, settings_key=key,
                               detection=result.detection, fuzzing=result.fuzzing,
                               usage=result.usage)
    else:
        failed[str(data["index"])] = "; ".join(result.errors) or "no label"


def _record(data: dict[str, Any]):
    from training.autointerp.explain import LatentRecord, Window

    return LatentRecord(index=data["index"], max_activation=data["max_activation"],
                        top=[Window(list(t), list(a)) for t, a in data["top"]],
                        quantiles=[[Window(list(t), list(a)) for t, a in bucket]
                                   for bucket in data["quantiles"]],
                        top_logits=data["top_logits"], bottom_logits=data["bottom_logits"])


def _negative_pool(sae_path: str, capture: str | None, model_name: str, settings: Settings):
    """Windows of the SAE's capture with every latent's code, and the tokenizer for them."""
    from training.autointerp.negatives import window_pool
    from training.data.activations import ActivationStore
    from training.data.models import load_tokenizer
    from training.sae.folder import load_sae

    if not capture or not Path(capture).is_dir():
        raise ValueError(f"scoring needs the SAE's capture, {capture!r}, which is not here: "
                         "give score=false to explain without scores")
    sae, _ = load_sae(Path(sae_path))
    pool = window_pool(sae.eval(), ActivationStore(Path(capture)))
    return pool, load_tokenizer(model_name, data_dir=settings.data_dir)


def _negatives(pool, tokenizer, index: int) -> list:
    from training.autointerp.explain import Window

    silent = pool.silent_windows(index)
    chosen = random.Random(index).sample(silent, min(NEGATIVES, len(silent)))
    return [Window([tokenizer.decode([t]) for t in pool.token_ids[w].tolist()],
                   [0.0] * pool.token_ids.shape[1]) for w in chosen]


def _embed(run: JobRun, sae_id: int) -> None:
    """Embed the new explanations for semantic search."""
    from app.store.semantic import embed_missing
    from training.autointerp.embeddings import EmbedderUnavailable, text_embedder

    run.update(force=True, message="embedding the explanations for semantic search")
    try:
        embed_missing(run.sessions, sae_id, text_embedder())
    except EmbedderUnavailable as exc:  # search stays full-text only; the labels are kept
        logging.getLogger(__name__).warning("explanations not embedded: %s", exc)
