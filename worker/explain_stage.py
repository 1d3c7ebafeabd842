"""The explain stage: label latents (offline with ``maxact``, or with Claude, an
OpenAI-compatible server or the local model), score the labels on held-out contexts, store
them with their sample sizes and usage, and embed them for semantic search.

Idempotent: latents already explained with the same settings key are skipped, so a
resumed or repeated job only does what is missing. A latent whose requests fail after
retries (rate limits, overload, exhausted credit) is reported in the job's result with the
error, never stored with a score. Only latents that fired over the analysed tokens are
explained: a latent without examples has nothing to explain.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.jobs import JobParams, parse_latents
from app.settings import Settings
from app.store import explanations as store
from app.store.models import Sae
from worker.runtime import JobRun

NEGATIVES = 10
"""Non-activating windows offered to an LLM's detection scoring per latent."""
BATCH_FROM = 200
"""Claude runs of at least this many latents go through the Message Batches API (half
the price, no rate limits to pace; results come when the batch ends)."""
BATCH_CHUNK = 500
"""Latents per message batch: each chunk is stored before the next one is sent."""
OFFLINE_CHUNK = 256
"""Latents read, labelled and stored together by the offline explainer."""
LLM_KINDS = ("claude", "openai", "local")


def resolve_kind(kind: str, settings: Settings) -> str:
    """``auto``: Claude with an API key, else an OpenAI-compatible server when one is
    configured, else the local model."""
    if kind != "auto":
        return kind
    if settings.anthropic_api_key:
        return "claude"
    return "openai" if settings.openai_base_url else "local"


def make_explainer(kind: str, params: JobParams, settings: Settings, model_name: str):
    """The explainer of a resolved ``kind`` (see ``resolve_kind``)."""
    if kind == "maxact":
        from training.autointerp.maxact import MaxActExplainer

        return MaxActExplainer()
    if kind == "claude":
        from training.autointerp.claude import ClaudeExplainer

        if not settings.anthropic_api_key:
            raise ValueError("explainer: claude needs ANTHROPIC_API_KEY (or "
                             "SAELAB_ANTHROPIC_API_KEY)")
        return ClaudeExplainer(api_key=settings.anthropic_api_key,
                               model=params.explainer_model or settings.claude_model,
                               base_url=settings.anthropic_base_url or None)
    if kind == "openai":
        from training.autointerp.openai_compat import OpenAIExplainer

        if not settings.openai_base_url:
            raise ValueError("explainer: openai needs SAELAB_OPENAI_BASE_URL (the server's "
                             "/v1 address)")
        return OpenAIExplainer(settings.openai_base_url,
                               params.explainer_model or settings.openai_model,
                               settings.openai_api_key)
    from training.autointerp.local import LocalExplainer
    from training.data.models import load_model

    local = params.explainer_model if params.explainer == "local" else None
    return LocalExplainer(load_model(local or model_name, data_dir=settings.data_dir))


def explain_stage(run: JobRun, params: JobParams, settings: Settings, sae_id: int, *,
                  kind: str, count: int | None = None) -> dict[str, Any]:
    """Explain SAE ``sae_id``'s chosen live latents (``count``: that many sampled across
    densities, else ``params.latent_range``) with explainer ``kind``; returns
    {"explainer", "explained", "skipped", "failed": {index: error}, "usage": totals}."""
    from training.autointerp.explain import MAXACT_SETTINGS, ExplainSettings, settings_key

    kind = resolve_kind(kind, settings)
    with run.sessions() as session:
        sae = session.get(Sae, sae_id)
        if sae is None:
            raise ValueError(f"sae_id: there is no SAE {sae_id} in the store")
        model_name, n_latents, sae_path = sae.model.name, sae.n_latents, sae.path
        capture = (sae.config or {}).get("activations")
        if count:
            indices = store.stratified_sample(session, sae_id, count)
        else:
            live = set(store.live_latents(session, sae_id))
            indices = [i for i in parse_latents(params.latent_range, n_latents) if i in live]
    explainer = make_explainer(kind, params, settings, model_name)
    shape = MAXACT_SETTINGS if kind == "maxact" else ExplainSettings()
    key = settings_key(explainer.name, explainer.model, score=params.score, **asdict(shape))
    with run.sessions() as session:
        done = store.explained_with(session, sae_id, key)
    todo = [i for i in indices if i not in done]
    run.update(force=True, message=f"explaining {len(todo)} latents with {explainer.name} "
                                   f"({len(indices) - len(todo)} already done)")
    calibrates = kind == "maxact" and _capture_here(capture)
    pool = _negative_pool(sae_path, capture, model_name, settings) if (
        todo and (params.score or calibrates)) else None
    work = _Work(run, explainer, key, sae_id, pool, params.score, settings.explain_max_usd)
    if kind == "maxact" and todo:
        work.frequencies = token_frequencies(capture, model_name, settings)
    summary = work.offline(todo) if kind == "maxact" else work.llm(todo)
    if todo and not summary["explained"]:
        first = next(iter(summary["failed"].values()))
        raise ValueError(f"no latent could be explained ({len(todo)} tried): {first}")
    summary.update(explainer=f"{explainer.name} ({explainer.model})",
                   skipped=len(indices) - len(todo))
    _embed(run, sae_id)
    return summary


class _Work:
    """One explain stage's latents, explained chunk by chunk and stored as they come."""

    def __init__(self, run: JobRun, explainer, key: str, sae_id: int, pool, score: bool,
                 max_usd: float | None = None):
        self.run, self.explainer, self.key, self.sae_id = run, explainer, key, sae_id
        self.pool, self.score, self.max_usd = pool, score, max_usd
        self.totals = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        self.failed: dict[str, str] = {}
        self.started, self.done = time.monotonic(), 0
        self.frequencies: dict[str, float] | None = None
        """The analysed text's token frequencies, for maxact's choice of tokens."""

    def offline(self, todo: list[int]) -> dict[str, Any]:
        """maxact labels, ``OFFLINE_CHUNK`` latents per read and per transaction."""
        from training.autointerp.explain import MAXACT_SETTINGS, explain_offline

        for first in range(0, len(todo), OFFLINE_CHUNK):
            loaded = self._load(todo[first:first + OFFLINE_CHUNK], MAXACT_SETTINGS.detection_n)
            results = [explain_offline(record, negatives, seed=data["index"], score=self.score,
                                       frequencies=self.frequencies,
                                       silent=calibration(self.pool, data["index"],
                                                          MAXACT_SETTINGS.detection_n))
                       for record, negatives, data in loaded]
            self._store(loaded, results, len(todo))
        return self._summary(len(todo))

    def llm(self, todo: list[int]) -> dict[str, Any]:
        """One latent at a time (or message batches for long Claude runs); stops at an error
        every later latent would hit too (a bad key, no credit)."""
        from training.autointerp.explain import explain_latent, explain_latents_batched

        batched = hasattr(self.explainer, "complete_batch") and len(todo) >= BATCH_FROM
        step = BATCH_CHUNK if batched else 1
        for first in range(0, len(todo), step):
            loaded = self._load(todo[first:first + step], NEGATIVES)
            pairs = [(record, negatives) for record, negatives, _ in loaded]
            results = (explain_latents_batched(pairs, self.explainer, score=self.score)
                       if batched else [explain_latent(*pairs[0], self.explainer,
                                                       seed=todo[first], score=self.score)])
            self._store(loaded, results, len(todo))
            fatal = next((r for r in results if r.fatal), None)
            if fatal is not None:
                raise ValueError(f"explainer {self.explainer.name} ({self.explainer.model}) "
                                 f"cannot go on: {'; '.join(fatal.errors)}")
            self._check_spend()
        return self._summary(len(todo))

    def _check_spend(self) -> None:
        """Stop once the job's spend reaches ``SAELAB_EXPLAIN_MAX_USD`` (what is explained
        so far is kept; a re-run continues after it)."""
        spent = self.totals["cost_usd"]
        if self.max_usd is not None and spent >= self.max_usd:
            raise ValueError(f"the explain job reached its spend cap: {spent:.4f} USD of "
                             f"SAELAB_EXPLAIN_MAX_USD={self.max_usd:g} after {self.done} "
                             "latents (their labels are kept; run it again to go on)")

    def _load(self, indices: list[int], negatives: int) -> list[tuple]:
        """(record, negatives, stored data) of each latent, read in one query."""
        with self.run.sessions() as session:
            rows = store.latents_for_explaining(session, self.sae_id, indices)
        return [(_record(data), _negatives(self.pool, data["index"], negatives)
                 if self.score else [], data) for data in rows]

    def _store(self, loaded: list[tuple], results: list, total: int) -> None:
        items = []
        for (_, _, data), result in zip(loaded, results, strict=True):
            for name in self.totals:
                self.totals[name] += result.usage.get(name, 0)
            if not result.label:
                self.failed[str(data["index"])] = "; ".join(result.errors) or "no label"
                continue
            items.append(store.NewExplanation(
                data["id"], result.label, self.explainer.model, self.key,
                detection=result.detection, fuzzing=result.fuzzing,
                simulation=result.simulation, detection_n=result.detection_n,
                fuzzing_n=result.fuzzing_n, simulation_n=result.simulation_n,
                usage=result.usage))
        store.save_explanations(self.run.sessions, items, supersede=(
            "maxact-" if self.explainer.name == "maxact" else None))
        self.done += len(loaded)
        rate = self.done / max(time.monotonic() - self.started, 1e-9) * 60
        self.run.progress(self.done, total, latents_per_min=rate,
                          cost_usd=self.totals["cost_usd"], failed=len(self.failed))

    def _summary(self, total: int) -> dict[str, Any]:
        return {"explained": total - len(self.failed), "failed": self.failed,
                "usage": self.totals}


def _record(data: dict[str, Any]):
    from training.autointerp.explain import LatentRecord, Window

    return LatentRecord(index=data["index"], max_activation=data["max_activation"],
                        top=[Window(list(t), list(a)) for t, a in data["top"]],
                        quantiles=[[Window(list(t), list(a)) for t, a in bucket]
                                   for bucket in data["quantiles"]],
                        top_logits=data["top_logits"], bottom_logits=data["bottom_logits"])


class Pool:
    """The capture's window pool with every window's token texts decoded once."""

    def __init__(self, pool, tokenizer) -> None:
        self.pool = pool
        ids = pool.token_ids
        text = {i: tokenizer.decode([i]) for i in ids.unique().tolist()}
        self.texts = [[text[i] for i in row] for row in ids.tolist()]


def _capture_here(capture: str | None) -> bool:
    """The SAE's capture folder is named and on this machine."""
    return bool(capture) and Path(capture).is_dir()


def _negative_pool(sae_path: str, capture: str | None, model_name: str,
                   settings: Settings) -> Pool:
    """Windows of the SAE's capture with every latent's code, and their texts."""
    from training.autointerp.negatives import window_pool
    from training.data.activations import ActivationStore
    from training.data.models import load_tokenizer
    from training.sae.folder import load_sae

    if not _capture_here(capture):
        raise ValueError(f"scoring needs the SAE's capture, {capture!r}, which is not here: "
                         "give score=false to explain without scores")
    sae, _ = load_sae(Path(sae_path))
    pool = window_pool(sae.eval(), ActivationStore(Path(capture)))
    return Pool(pool, load_tokenizer(model_name, data_dir=settings.data_dir))


def token_frequencies(capture: str | None, model_name: str, settings: Settings
                      ) -> dict[str, float] | None:
    """Each token's share of the SAE's capture (BOS excluded), by loose key; None without
    the capture (maxact then falls back to its coverage rules)."""
    from training.autointerp.token_choice import loose_frequencies
    from training.data.activations import ActivationStore
    from training.data.models import load_tokenizer

    if not _capture_here(capture):
        return None
    ids = ActivationStore(Path(capture)).tokens()[:, 1:].reshape(-1).long()
    counts = ids.bincount()
    tokenizer = load_tokenizer(model_name, data_dir=settings.data_dir)
    by_text: Counter[str] = Counter()
    for i in counts.nonzero().flatten().tolist():  # (ids may share a text)
        by_text[tokenizer.decode([i])] += int(counts[i])
    return loose_frequencies(by_text)


def _negatives(pool: Pool, index: int, count: int) -> list:
    """Up to ``count`` windows where latent ``index`` never fires (a fixed draw per latent)."""
    from training.autointerp.explain import Window

    _, chosen = _silent_split(pool, index, count)
    return [Window(pool.texts[w], [0.0] * len(pool.texts[w])) for w in chosen]


def calibration(pool: Pool | None, index: int, negatives: int) -> list[list[str]]:
    """Token texts of latent ``index``'s silent windows that are not among the
    ``negatives`` it is scored on, for maxact's false-alarm estimates (none without a
    pool: they are then modelled from token frequencies)."""
    if pool is None:
        return []
    silent, scored = _silent_split(pool, index, negatives)
    scored_set = set(scored)
    return [pool.texts[w] for w in silent if w not in scored_set]


def _silent_split(pool: Pool, index: int, count: int) -> tuple[list[int], list[int]]:
    """Latent ``index``'s silent windows, and the ``count`` of them (fewer if there are
    fewer) drawn for scoring, a fixed draw per latent."""
    silent = pool.pool.silent_windows(index)
    return silent, random.Random(index).sample(silent, min(count, len(silent)))


def _embed(run: JobRun, sae_id: int) -> None:
    """Embed the new explanations for semantic search."""
    from app.store.semantic import embed_missing
    from training.autointerp.embeddings import EmbedderUnavailable, text_embedder

    run.update(force=True, message="embedding the explanations for semantic search")
    try:
        embed_missing(run.sessions, sae_id, text_embedder())
    except EmbedderUnavailable as exc:  # search stays full-text only; the labels are kept
        logging.getLogger(__name__).warning("explanations not embedded: %s", exc)
