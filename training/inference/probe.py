"""Which SAE latents fire on a piece of text, token by token.

The text is tokenised the way capture does it (BOS, then the text without special
tokens), block L's output is taken with the early-stopping forward pass, and every
position but BOS is encoded by the SAE (the SAE never saw BOS activations in training).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from training.data.hooks import sae_inputs
from training.data.models import LoadedModel
from training.inference.sampling import REPLACEMENT_CHAR
from training.sae.autoencoder import SparseAutoencoder

UTF8_MAX_BYTES = 4


@dataclass(frozen=True)
class RankedFeature:
    """A latent on a probed text: its max here, that max relative to its own max over the
    analysed tokens, the tokens it fired on, and whether it is an attention sink."""

    index: int
    max: float
    relative: float
    count: int
    sink: bool


@dataclass
class ProbeResult:
    """The SAE code of each token of a text (BOS excluded), on the CPU."""

    tokens: list[str]
    """Each token's text; concatenated they give the text back. A token holding only part
    of a multi-byte character shows "" and the token completing it the whole character."""
    ids: list[int]
    values: Tensor
    """[T, m] activations of the selected latents (0 in unused slots)."""
    indices: Tensor
    """[T, m] latent indices."""

    def activations_of(self, feature: int) -> list[float]:
        """Latent ``feature``'s activation on each token (0 where it did not fire)."""
        return (self.values * (self.indices == feature)).sum(1).tolist()

    def top_features(self, limit: int = 20) -> list[tuple[int, float, int]]:
        """(feature, max activation over the text, tokens it fired on), by max descending."""
        return sorted(self._peaks(), key=lambda t: (-t[1], t[0]))[:limit]

    def fired_features(self) -> list[int]:
        """Every latent that fires somewhere on the text."""
        return [f for f, _, _ in self._peaks()]

    def _peaks(self) -> list[tuple[int, float, int]]:
        fired = self.values > 0
        features, slots = self.indices[fired].unique(return_inverse=True)
        values = self.values[fired]
        peak = values.new_zeros(len(features)).scatter_reduce_(0, slots, values, "amax")
        count = torch.bincount(slots, minlength=len(features))
        return [(int(f), float(p), int(c)) for f, p, c in zip(features.tolist(), peak.tolist(),
                                                               count.tolist(), strict=True)]

    def ranked_features(self, maxima: Mapping[int, float], sinks: Collection[int] = (), *,
                        by: Literal["relative", "raw"] = "relative",
                        sinks_last: bool = True, limit: int = 20) -> list[RankedFeature]:
        """The latents on the text, best first: by their max here relative to their own
        max over the analysed tokens (``maxima``; a rare latent firing at its usual
        strength beats a dense one firing weakly) or by the raw max; attention-sink latents
        (``sinks``) after all others unless ``sinks_last`` is False."""
        ranked = []
        for f, peak, count in self._peaks():
            own = float(maxima.get(f) or 0.0)
            ranked.append(RankedFeature(f, peak, peak / own if own > 0 else 0.0, count,
                                        f in sinks))
        key = (lambda r: r.relative) if by == "relative" else (lambda r: r.max)
        ranked.sort(key=lambda r: (r.sink and sinks_last, -key(r), r.index))
        return ranked[:limit]

    def token_features(self, position: int, limit: int = 10) -> list[tuple[int, float]]:
        """(feature, activation) of the latents firing on token ``position``, descending."""
        if not 0 <= position < len(self.ids):
            raise ValueError(f"position {position} is out of range: the text has "
                             f"{len(self.ids)} tokens")
        pairs = [(int(f), float(v)) for f, v in zip(self.indices[position],
                                                    self.values[position], strict=True)
                 if v > 0]
        return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:limit]


def probe_text(lm: LoadedModel, sae: SparseAutoencoder, layer: int, text: str,
               max_tokens: int = 1024) -> ProbeResult:
    """The SAE code of every token of ``text`` at block ``layer``'s output (its MLP's
    input for a transcoder)."""
    lm.check_layer(layer)
    if sae.cfg.d_in != lm.d_model:
        raise ValueError(f"the SAE reads width {sae.cfg.d_in} but {lm.name} has "
                         f"width {lm.d_model}")
    ids = _text_ids(lm, text, max_tokens)
    inputs = torch.tensor([[lm.bos_id, *ids]], device=lm.device)
    acts = sae_inputs(lm.model, lm.blocks, layer, inputs, sae.cfg.site)[0, 1:]
    with torch.no_grad():
        enc = sae.encode(acts.to(device=sae.w_dec.device, dtype=sae.w_dec.dtype))
    return ProbeResult(tokens=token_texts(lm.tokenizer, ids), ids=ids,
                       values=enc.values.detach().cpu(), indices=enc.indices.cpu())


def _text_ids(lm: LoadedModel, text: str, max_tokens: int) -> list[int]:
    if not text:
        raise ValueError("the text is empty")
    ids = [int(token) for token in lm.tokenizer.encode(text, add_special_tokens=False)]
    if not ids:
        raise ValueError("the text has no tokens")
    limit = getattr(lm.model.config, "max_position_embeddings", None) or max_tokens + 1
    allowed = min(max_tokens, limit - 1)
    if len(ids) > allowed:
        raise ValueError(f"the text has {len(ids)} tokens; the probe takes at most {allowed}")
    return ids


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each id decoded on its own (keeps its spaces and newlines as they are). Ids that
    are parts of one multi-byte character are decoded together: the last gets the
    character, the others ""."""
    texts: list[str] = []
    pending: list[int] = []
    for token in ids:
        pending.append(token)
        text = tokenizer.decode(pending)
        if text.endswith(REPLACEMENT_CHAR) and len(pending) < UTF8_MAX_BYTES:
            texts.append("")
            continue
        texts.append(text)
        pending = []
    if pending:  # bytes that never formed a character
        texts[-1] = tokenizer.decode(pending)
    return texts


MAX_CONTRAST_TEXTS = 32
"""Texts per side of a contrast: each one is a forward pass."""
MIN_CONTRAST_SCORE = 1e-6
"""Scores below this are rounding, not specificity (equal sets sum in another order)."""


def contrast_texts(lm: LoadedModel, sae: SparseAutoencoder, layer: int, texts_a: list[str],
                   texts_b: list[str], limit: int = 20) -> list[tuple[int, float, float, float]]:
    """The latents most specific to the texts of set A compared with set B.

    With m_f(t) = latent f's max activation over the tokens of text t (0 if it never
    fires), a_f = mean over A of m_f(t), b_f = the same over B, and
    M_f = max over A ∪ B of m_f(t), the score is (a_f − b_f) / M_f: 1 when f fires on
    every A text at its peak and never on B, 0 when it is as active on both, negative
    when it prefers B. Dividing by M_f makes weak and strong latents comparable.
    Returns (feature, score, a_f, b_f) of the ``limit`` best latents with a positive
    score (at least ``MIN_CONTRAST_SCORE``), best first; scores equal to 9 decimals (a
    latent on one text of three scores exactly 1/3) rank the larger a_f, then the lower
    index, first.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    for name, texts in (("texts_a", texts_a), ("texts_b", texts_b)):
        if not texts:
            raise ValueError(f"{name} is empty: a contrast needs texts on both sides")
        if len(texts) > MAX_CONTRAST_TEXTS:
            raise ValueError(f"{name} has {len(texts)} texts; at most "
                             f"{MAX_CONTRAST_TEXTS} are compared")
    maxima_a = _text_maxima(lm, sae, layer, texts_a, "texts_a")
    maxima_b = _text_maxima(lm, sae, layer, texts_b, "texts_b")
    peak = torch.maximum(maxima_a.max(0).values, maxima_b.max(0).values)  # [n] = M_f
    a, b = maxima_a.double().mean(0), maxima_b.double().mean(0)
    score = torch.where(peak > 0, (a - b) / peak.double().clamp(min=1e-12), 0.0)
    scores, means_a, means_b = score.tolist(), a.tolist(), b.tolist()
    chosen = sorted(torch.nonzero(score >= MIN_CONTRAST_SCORE).flatten().tolist(),
                    key=lambda f: (-round(scores[f], 9), -means_a[f], f))
    return [(f, scores[f], means_a[f], means_b[f]) for f in chosen[:limit]]


def _text_maxima(lm: LoadedModel, sae: SparseAutoencoder, layer: int, texts: list[str],
                 name: str) -> Tensor:
    """[len(texts), n_latents]: each latent's max activation over each text's tokens."""
    rows = []
    for position, text in enumerate(texts):
        try:
            result = probe_text(lm, sae, layer, text)
        except ValueError as exc:
            raise ValueError(f"{name}[{position}]: {exc}") from None
        rows.append(torch.zeros(sae.cfg.n_latents).scatter_reduce_(
            0, result.indices.flatten(), result.values.flatten().float(), "amax"))
    return torch.stack(rows)
