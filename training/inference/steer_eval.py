"""Steering, measured: does clamping a latent make the model's output carry it, and at what
cost to fluency?

For each latent, each of a fixed set of neutral prompts and each clamp strength v (in units
of the latent's max activation), a steered reply is decoded beside an unsteered baseline
with the same seed; both are then read back by the *unsteered* model:

* concept: the latent's mean activation over the reply's tokens, divided by its max — did
  the output come to carry the feature? (steered vs the baseline reply);
* fluency: the unsteered model's mean per-token loss on the reply (steered vs baseline).

A prompt counts as steered at v when the concept rises by at least ``rise`` (a tenth of the
latent's max per token) while the loss rises by at most ``fluency_bound`` nats per token.
A latent's steerability is the best share of steered prompts over the strengths, and its
best strength the smallest v reaching it. Replies of many (latent, strength) pairs decode
as rows of one batch per prompt; row 0 is the shared baseline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from training.data.hooks import recording_sae_input
from training.data.models import LoadedModel
from training.inference.sampling import (
    Edit,
    Sampling,
    decode_ids,
    edit_at,
    special_token_ids,
)
from training.inference.steering import chat_prompt_ids, latent_values
from training.sae.autoencoder import SparseAutoencoder

NEUTRAL_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Describe your ideal weekend.",
    "Explain how a bicycle works.",
    "What should I cook for dinner tonight?",
    "Tell me about the history of the city you like most.",
    "Give me three tips for learning a new language.",
    "Write a letter to a friend you have not seen in years.",
    "Describe the view from a mountain top.",
)
DEFAULT_STRENGTHS = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class SteerEvalConfig:
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    max_tokens: int = 32
    """New tokens per reply."""
    temperature: float = 0.7
    seed: int = 0
    rise: float = 0.1
    """Concept rise (mean activation per reply token, in units of the latent's max) that
    counts as the output carrying the feature."""
    fluency_bound: float = 1.0
    """Largest rise of the unsteered model's loss (nats per token) still counted fluent."""
    rows: int = 33
    """Rows of one decoding batch (the baseline and (latent, strength) pairs)."""

    def __post_init__(self) -> None:
        if len(self.prompts) < 1 or not all(p.strip() for p in self.prompts):
            raise ValueError("steer-eval needs at least one non-empty prompt")
        if not self.strengths or not all(math.isfinite(s) for s in self.strengths):
            raise ValueError("strengths must be finite numbers")
        if self.rows < 2 or len(self.strengths) > self.rows - 1:
            raise ValueError(f"rows must hold the baseline and every strength ({self.rows})")


@dataclass
class StrengthFigures:
    """One strength's figures for a latent, over the prompts."""

    strength: float
    concept_baseline: float
    concept_steered: float
    loss_baseline: float | None
    loss_steered: float | None
    steered_share: float
    """Share of prompts where the concept rose clearly within the fluency bound."""


@dataclass
class SteerEvalRecord:
    index: int
    steerability: float
    best_strength: float | None
    prompts: int
    rise: float
    fluency_bound: float
    strengths: list[StrengthFigures] = field(default_factory=list)


@dataclass
class _Reply:
    concept: float
    loss: float | None


def steer_eval(lm: LoadedModel, sae: SparseAutoencoder, layer: int, latents: Sequence[int],
               maxima: Mapping[int, float], cfg: SteerEvalConfig | None = None,
               on_prompt=None) -> list[SteerEvalRecord]:
    """Steerability of each latent in ``latents`` (see the module docstring); ``maxima``
    holds their max activations; ``on_prompt(done, total)`` reports progress."""
    cfg = cfg or SteerEvalConfig()
    lm.check_layer(layer)
    per_batch = max(1, (cfg.rows - 1) // len(cfg.strengths))
    groups = [list(latents[i:i + per_batch]) for i in range(0, len(latents), per_batch)]
    figures: dict[tuple[int, float], list[tuple[_Reply, _Reply]]] = {}
    total, done = len(groups) * len(cfg.prompts), 0
    for group in groups:
        for prompt in cfg.prompts:
            for key, pair in _one_prompt(lm, sae, layer, group, maxima, prompt, cfg).items():
                figures.setdefault(key, []).append(pair)
            done += 1
            if on_prompt is not None:
                on_prompt(done, total)
    return [_record(f, figures, cfg) for f in latents]


def _one_prompt(lm: LoadedModel, sae: SparseAutoencoder, layer: int, group: list[int],
                maxima: Mapping[int, float], prompt: str, cfg: SteerEvalConfig
                ) -> dict[tuple[int, float], tuple[_Reply, _Reply]]:
    """(latent, strength) -> (baseline reply, steered reply) figures for one prompt."""
    pairs = [(f, s) for f in group for s in cfg.strengths]
    features = torch.tensor([-1] + [f for f, _ in pairs])
    targets = torch.tensor([0.0] + [s * float(maxima[f]) for f, s in pairs])
    prompt_ids = chat_prompt_ids(lm, prompt)
    sampling = Sampling(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
    replies = decode_ids(lm, prompt_ids, len(features), sampling, layer=layer,
                         edit=per_row_clamp(sae, features, targets))
    baseline = {f: _read_back(lm, sae, layer, prompt_ids, replies[0], f, maxima[f])
                for f in group}
    return {(f, s): (baseline[f], _read_back(lm, sae, layer, prompt_ids, replies[row], f,
                                             maxima[f]))
            for row, (f, s) in enumerate(pairs, start=1)}


def per_row_clamp(sae: SparseAutoencoder, features: Tensor, targets: Tensor) -> Edit:
    """Row r of the batch clamps latent ``features[r]`` at ``targets[r]`` (raw units);
    rows with feature −1 are left alone. The SAE's error term is kept, as on the steer
    page: h' = h + (target − z_f(h))·W_dec[f]."""
    w_dec = sae.w_dec.detach()
    device = w_dec.device
    features, targets = features.to(device), targets.to(device, w_dec.dtype)
    rows_w = w_dec[features.clamp_min(0)] * (features >= 0)[:, None]

    def edit(h: Tensor, steerable: Tensor | None = None, source: Tensor | None = None
             ) -> Tensor:
        batch, tokens, d = h.shape
        x = (h if source is None else source).reshape(-1, d).to(device, w_dec.dtype)
        row = torch.arange(batch, device=device).repeat_interleave(tokens)
        z = latent_values(sae, x, features.clamp_min(0))  # [N, R]: z of every row's feature
        coef = targets[row] - z.gather(1, row[:, None]).squeeze(1)
        delta = (coef[:, None] * rows_w[row]).reshape(batch, tokens, d)
        if steerable is not None:
            delta = delta * steerable[..., None].to(delta.dtype)
        return h + delta.to(h.device, h.dtype)

    return edit_at(edit, sae.cfg.site)


@torch.inference_mode()
def _read_back(lm: LoadedModel, sae: SparseAutoencoder, layer: int, prompt_ids: list[int],
               reply: list[int], feature: int, maximum: float) -> _Reply:
    """The unsteered model reading prompt + reply: latent ``feature``'s mean activation
    over the reply's (non-special) tokens / its max, and the mean loss of the reply."""
    if not reply:
        return _Reply(0.0, None)
    with recording_sae_input(lm.blocks, layer, sae.cfg.site) as captured:
        ids = torch.tensor([prompt_ids + reply], device=lm.device)
        logits = lm.model(input_ids=ids, use_cache=False).logits[0].float()
    start = len(prompt_ids)
    special = special_token_ids(lm)
    keep = torch.tensor([t not in special for t in reply], device=lm.device)
    hidden = captured[0][0, start:][keep]
    z = latent_values(sae, hidden.to(sae.w_dec.device, sae.w_dec.dtype),
                      torch.tensor([feature], device=sae.w_dec.device))
    concept = float(z.mean()) / maximum if len(hidden) and maximum > 0 else 0.0
    loss = torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[0, start:])
    return _Reply(concept, float(loss))


def _record(feature: int, figures: dict[tuple[int, float], list[tuple[_Reply, _Reply]]],
            cfg: SteerEvalConfig) -> SteerEvalRecord:
    record = SteerEvalRecord(feature, 0.0, None, len(cfg.prompts), cfg.rise, cfg.fluency_bound)
    for strength in cfg.strengths:
        pairs = figures[(feature, strength)]
        steered = [_steered(base, new, cfg) for base, new in pairs]
        share = sum(steered) / len(steered)
        record.strengths.append(StrengthFigures(
            strength, _mean([b.concept for b, _ in pairs]), _mean([n.concept for _, n in pairs]),
            _mean([b.loss for b, _ in pairs]), _mean([n.loss for _, n in pairs]), share))
        if share > record.steerability:
            record.steerability, record.best_strength = share, strength
    return record


def _steered(base: _Reply, new: _Reply, cfg: SteerEvalConfig) -> bool:
    if base.loss is None or new.loss is None:
        return False
    return (new.concept - base.concept >= cfg.rise
            and new.loss - base.loss <= cfg.fluency_bound)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None
