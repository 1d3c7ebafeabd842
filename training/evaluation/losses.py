"""The evaluation's losses from logits, a chunk of one context's positions at a time.

Each chunk is ``logits[b, positions]``, a view (no copy of the [B, T, V] logits); each of
its log-softmaxes is taken once, in float32 whatever the logits' dtype (a bf16 model's are
cast up a chunk at a time, so no loss reads rounded log-probabilities). Sums are float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_CHUNK = 512
"""Positions of one context whose [chunk, vocab] log-probabilities are computed at once."""


def chunks(ids: Tensor) -> Iterator[tuple[int, slice, Tensor]]:
    """(context b, positions, their targets [chunk, 1]) over every predicted position of
    ids [B, T], a chunk inside one context so that ``logits[b, positions]`` is a view."""
    predicted = ids.shape[1] - 1
    for b in range(ids.shape[0]):
        for start in range(0, predicted, LOSS_CHUNK):
            stop = min(start + LOSS_CHUNK, predicted)
            yield b, slice(start, stop), ids[b, start + 1: stop + 1].unsqueeze(1)


def clean_log_probs(logits: Tensor, ids: Tensor) -> tuple[Tensor, float]:
    """float32 log-probabilities of the clean logits [B, ≥ T − 1, V] at the predicted
    positions of ids, which every SAE of a family reuses, and their summed next-token CE.
    float32 logits become them in place (a chunk at a time: no second [B, T, V] tensor);
    lower-precision ones get a float32 copy, so the KL never reads rounded log-probs."""
    out = logits if logits.dtype == torch.float32 else torch.empty(
        logits.shape, dtype=torch.float32, device=logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b, positions, target in chunks(ids):
        log_p = F.log_softmax(logits[b, positions].float(), -1)
        out[b, positions] = log_p
        total -= log_p.gather(1, target).sum().double()
    return out, float(total)


def spliced_losses(clean_log_p: Tensor, spliced: Tensor, ids: Tensor) -> tuple[float, float]:
    """Summed next-token CE of the spliced logits [B, ≥ T − 1, V] and KL(clean ‖ spliced),
    from the clean log-probabilities of :func:`clean_log_probs`; one log-softmax."""
    sums = torch.zeros(2, dtype=torch.float64, device=spliced.device)
    for b, positions, target in chunks(ids):
        log_p = clean_log_p[b, positions]
        log_q = F.log_softmax(spliced[b, positions].float(), -1)
        sums += torch.stack([-log_q.gather(1, target).sum(),
                             (log_p.exp() * (log_p - log_q)).sum()]).double()
    ce_sae, kl = sums.tolist()
    return ce_sae, kl


def pair_losses(clean: Tensor, spliced: Tensor, ids: Tensor) -> tuple[float, float, float]:
    """Summed next-token CE of the clean and the spliced logits [B, ≥ T − 1, V] and
    KL(clean ‖ spliced), each chunk's two log-softmaxes in float32 (the figures of
    :func:`clean_log_probs` then :func:`spliced_losses`, without keeping the clean
    log-probabilities: one SAE has no use for them)."""
    sums = torch.zeros(3, dtype=torch.float64, device=spliced.device)
    for b, positions, target in chunks(ids):
        log_p = F.log_softmax(clean[b, positions].float(), -1)
        log_q = F.log_softmax(spliced[b, positions].float(), -1)
        sums += torch.stack([-log_p.gather(1, target).sum(), -log_q.gather(1, target).sum(),
                             (log_p.exp() * (log_p - log_q)).sum()]).double()
    ce_clean, ce_sae, kl = sums.tolist()
    return ce_clean, ce_sae, kl


def summed_ce_of_logits(logits: Tensor, ids: Tensor) -> float:
    """Σ next-token CE of logits [B, ≥ T − 1, V] over the predicted positions of ids."""
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b, positions, target in chunks(ids):
        total += F.cross_entropy(logits[b, positions].float(), target[:, 0],
                                 reduction="sum").double()
    return float(total)


def clean_kl_terms(logits: Tensor, ids: Tensor, unembed: Tensor) -> tuple[Tensor, Tensor]:
    """What a recorded clean pass keeps for the KL (``training.evaluation.records``), at
    the predicted positions of ids [B, T]: the log-normaliser logsumexp(z_p) [B, T − 1]
    of the clean logits [B, ≥ T − 1, V] and the mean unembedding ū = Σ_v p(v) W_U[v]
    [B, T − 1, d] of their softmax p (float32 both); ``unembed`` is W_U [V, d] in float32."""
    batch, predicted = ids.shape[0], ids.shape[1] - 1
    log_normaliser = torch.empty(batch, predicted, dtype=torch.float32, device=logits.device)
    mean_unembed = torch.empty(batch, predicted, unembed.shape[1], dtype=torch.float32,
                               device=logits.device)
    for b, positions, _target in chunks(ids):
        chunk = logits[b, positions].float()
        log_normaliser[b, positions] = torch.logsumexp(chunk, -1)
        p = torch.softmax(chunk, -1)
        torch.mm(p, unembed, out=mean_unembed[b, positions])
    return log_normaliser, mean_unembed


def recorded_losses(spliced: Tensor, states: Tensor, ids: Tensor, clean_states: Tensor,
                    clean_log_normaliser: Tensor, mean_unembed: Tensor) -> tuple[float, float]:
    """Summed next-token CE of the spliced logits z_q [B, ≥ T − 1, V] (as ``spliced_losses``
    sums it) and KL(clean ‖ spliced) from a recorded clean pass, without the clean
    distribution: with z = W_U u for the final norm's outputs u, Σ_v p(v) z_q(v) − Σ_v p(v)
    z_p(v) = ū · (u_q − u_p), so per position

        KL(p ‖ q) = logsumexp(z_q) − logsumexp(z_p) − ū · (u_q − u_p),

    each term small where the SAE's output is close to the clean one (float64 sums).
    ``states``/``clean_states``: u_q, u_p [B, ≥ T − 1, d]."""
    sums = torch.zeros(2, dtype=torch.float64, device=spliced.device)
    for b, positions, target in chunks(ids):
        logits = spliced[b, positions].float()
        log_q = F.log_softmax(logits, -1)
        sums += torch.stack([-log_q.gather(1, target).sum().double(),
                             torch.logsumexp(logits, -1).double().sum()])
    predicted = ids.shape[1] - 1
    moved = states[:, :predicted].double() - clean_states[:, :predicted].double()
    cross = float((mean_unembed.double() * moved).sum())
    ce_sae, log_normalisers = sums.tolist()
    return ce_sae, log_normalisers - float(clean_log_normaliser.double().sum()) - cross
