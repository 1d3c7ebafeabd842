"""Per-latent analysis of an SAE over a capture: one streaming pass, every latent at once.

The pass reads the capture chunk by chunk (C contexts × (T−1) positions) and keeps, per
latent, only fixed-size state — memory is O(n × examples), never O(tokens):

* firing count, activation sum and max (``index_add_`` / ``scatter_reduce_`` over the
  sparse codes);
* a histogram of the activation over bins fitted to the latent's own range
  (``histogram.FittedHistograms``: linear bins whose width doubles, merging exactly, as
  the running max grows);
* the top-N contexts by their peak activation (per-context max over positions, then a
  running top-k over contexts of [C, n] merged with the kept [N, n]);
* a uniform sample of the contexts where the latent fired (each firing context gets a
  random priority; a running top-k of priorities is a reservoir sample) from which the
  quantile examples are drawn once the max is known.

When a context enters a latent's top or reservoir set, the latent's activations over a
±W-token window around its peak are cut from that chunk's codes and kept (pruned as
entries leave the sets), so no second pass over the capture is needed: at the end the
chosen windows are looked up and paired with the capture's token ids. Logit effects are
W_dec[f] · W_U (the unembedding), decoder neighbours the cosine similarity of decoder rows;
both are computed in chunks of latents. Quantile samples never repeat a top example, and
attention-sink latents are flagged from the chosen examples (``sinks``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from training.analysis.cofiring import CoFiring, CoFiringCounter
from training.analysis.effects import decoder_neighbours, logit_effects
from training.analysis.examples import ExampleSet, WindowTable
from training.analysis.histogram import FittedHistograms
from training.analysis.sinks import SinkReport, detect_sinks
from training.data.activations import ActivationStore
from training.sae.autoencoder import SparseAutoencoder


@dataclass
class AnalysisConfig:
    top_examples: int = 20
    """Top contexts kept per latent."""
    quantile_buckets: int = 10
    per_bucket: int = 5
    window: int = 16
    """Tokens each side of the peak in an example."""
    histogram_bins: int = 64
    """Linear bins over [0, M_f), M_f the power of two at or above the latent's max (a
    power of two itself)."""
    logit_tokens: int = 10
    neighbours: int = 10
    reservoir: int = 100
    """Firing contexts sampled per latent for the quantile examples."""
    cofire_tokens: int = 16_384
    """Tokens (the first analysed) on which co-firing is counted."""
    cofire_partners: int = 10
    chunk_contexts: int | None = None
    """Contexts encoded at once [default: as many as keep the dense pre-activations
    (C·(T−1) × n floats) near 128 MB, at most 64]."""
    seed: int = 0


@dataclass
class AnalysisResult:
    """Everything the store keeps about each latent, as arrays over latents [n, ...]."""

    tokens: int
    density: Tensor
    mean_activation: Tensor
    max_activation: Tensor
    histogram_scale: Tensor
    """M_f [n]: bin j of latent f counts activations in [j·M_f/B, (j+1)·M_f/B)."""
    histogram_counts: Tensor
    """[n, B]."""
    top_logits: Tensor
    top_logit_ids: Tensor
    bottom_logits: Tensor
    bottom_logit_ids: Tensor
    neighbour_ids: Tensor
    neighbour_cosines: Tensor
    examples: ExampleSet
    sinks: SinkReport
    cofiring: CoFiring
    seconds: dict[str, float]
    """Wall time of each phase: pass, examples, logit_effects, neighbours."""


class _State:
    """The running per-latent state of pass 1: fixed size, whatever the token count."""

    def __init__(self, n: int, cfg: AnalysisConfig) -> None:
        self.n, self.cfg, self.tokens = n, cfg, 0
        self.fired = torch.zeros(n, dtype=torch.long)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.peak = torch.zeros(n)
        self.hist = FittedHistograms(n, cfg.histogram_bins)
        self.top_val = torch.zeros(cfg.top_examples, n)
        self.top_ctx = torch.full((cfg.top_examples, n), -1, dtype=torch.long)
        self.top_pos = torch.zeros(cfg.top_examples, n, dtype=torch.long)
        self.res_key = torch.full((cfg.reservoir, n), -1.0)
        self.res_ctx = torch.full((cfg.reservoir, n), -1, dtype=torch.long)
        self.res_pos = torch.zeros(cfg.reservoir, n, dtype=torch.long)
        self.res_val = torch.zeros(cfg.reservoir, n)
        self.windows = WindowTable(cfg.window)
        self.cofiring = CoFiringCounter(n, cfg.cofire_tokens)

    def live_keys(self) -> Tensor:
        """context·n + latent of every kept top and reservoir entry."""
        cols = torch.arange(self.n)
        keys = [(ctx * self.n + cols)[ctx >= 0] for ctx in (self.top_ctx, self.res_ctx)]
        return torch.cat(keys)


def _running_top(keys: Tensor, extras: list[Tensor], new_keys: Tensor,
                 new_extras: list[Tensor], width: int
                 ) -> tuple[Tensor, list[Tensor], Tensor]:
    """Merge kept [w, n] with new [C, n] column-wise; keep the ``width`` largest keys.
    Also returns where each kept slot came from: ≥ w means row (index − w) of the new."""
    merged = torch.cat([keys, new_keys])
    top = merged.topk(width, dim=0)
    return top.values, [torch.cat([a, b]).gather(0, top.indices)
                        for a, b in zip(extras, new_extras, strict=True)], top.indices


@torch.no_grad()
def _sparse_codes(sae: SparseAutoencoder, acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The firing entries of a chunk [C, P, d]: (row in C·P, latent, value), each [m]."""
    flat = acts.reshape(-1, acts.shape[-1]).float().to(sae.b_dec.device)
    enc = sae.encode(flat)
    values, latents = enc.values.cpu(), enc.indices.cpu()
    rows = torch.arange(values.shape[0])[:, None].expand_as(values)
    fired = values > 0
    return rows[fired], latents[fired], values[fired]


def _update(state: _State, acts: Tensor, sae: SparseAutoencoder, first_context: int,
            gen: torch.Generator) -> None:
    """Fold one chunk of activations [C, P, d] into the running state. Statistics come
    from the sparse codes (k per token, not n); a dense [C, P, n] copy is only built to
    cut the windows of the contexts that enter a latent's kept sets."""
    cfg, n = state.cfg, state.n
    contexts, positions = acts.shape[:2]
    rows, latents, values = _sparse_codes(sae, acts)
    state.cofiring.add(rows, latents, contexts * positions)
    state.tokens += contexts * positions
    state.fired += torch.bincount(latents, minlength=n)
    state.total.index_add_(0, latents, values.double())
    state.peak.scatter_reduce_(0, latents, values, "amax")
    state.hist.add(latents, values)

    # each context's peak per latent and where it is: [C, n]
    key = (rows // positions) * n + latents
    ctx_max = torch.zeros(contexts * n).scatter_reduce_(0, key, values, "amax")
    at_peak = values == ctx_max[key]
    ctx_pos = torch.zeros(contexts * n, dtype=torch.long)
    ctx_pos[key[at_peak]] = rows[at_peak] % positions
    ctx_max, ctx_pos = ctx_max.view(contexts, n), ctx_pos.view(contexts, n)

    ctx_ids = torch.arange(first_context, first_context + contexts)[:, None].expand(-1, n)
    state.top_val, (state.top_ctx, state.top_pos), top_from = _running_top(
        state.top_val, [state.top_ctx, state.top_pos], ctx_max, [ctx_ids, ctx_pos],
        cfg.top_examples)
    keys = torch.rand(ctx_max.shape, generator=gen).masked_fill(ctx_max <= 0, -1.0)
    state.res_key, (state.res_ctx, state.res_pos, state.res_val), res_from = _running_top(
        state.res_key, [state.res_ctx, state.res_pos, state.res_val], keys,
        [ctx_ids, ctx_pos, ctx_max], cfg.reservoir)
    entered = torch.cat([_entrants(top_from, cfg.top_examples, state.top_val > 0),
                         _entrants(res_from, cfg.reservoir, state.res_key >= 0)])
    if len(entered):
        _keep_windows(state, entered, (rows, latents, values), ctx_pos, positions,
                      first_context)


def _entrants(origin: Tensor, width: int, valid: Tensor) -> Tensor:
    """Keys (context row · n + latent) of the kept slots [w, n] filled from this chunk."""
    slot, latent = ((origin >= width) & valid).nonzero(as_tuple=True)
    return (origin[slot, latent] - width) * origin.shape[1] + latent


def _keep_windows(state: _State, entered: Tensor, codes: tuple[Tensor, Tensor, Tensor],
                  ctx_pos: Tensor, positions: int, first_context: int) -> None:
    """Cut the peak ± W window of every entrant (key c·n + f: context row c of the chunk,
    latent f) out of the chunk's sparse codes — each firing entry whose (context, latent)
    is an entrant's and lies within W of its peak lands in that window — and add the
    windows to the table. No dense [C, P, n] copy of the chunk is made."""
    n, width = state.n, state.cfg.window
    entered = entered.unique()  # sorted
    rows, latents, values = codes
    key = (rows // positions) * n + latents
    slot = torch.searchsorted(entered, key).clamp_max(len(entered) - 1)
    offset = rows % positions - ctx_pos.view(-1)[entered[slot]] + width
    hit = (entered[slot] == key) & (offset >= 0) & (offset <= 2 * width)
    acts = torch.zeros(len(entered), 2 * width + 1)
    acts[slot[hit], offset[hit]] = values[hit]
    state.windows.add(first_context * n + entered, acts)
    state.windows.prune_if_large(state.live_keys)


def _quantile_picks(state: _State) -> tuple[Tensor, Tensor, Tensor]:
    """From the reservoir [R, n], up to ``per_bucket`` contexts per activation decile of
    each latent's max, never one of the latent's top contexts (the highest bucket would
    repeat the top list): bucket [R, n] (−1 = not picked), rank within the bucket [R, n]
    and the picked mask [R, n]."""
    cfg = state.cfg
    valid = (state.res_key >= 0) & ~_in_top(state)
    rel = state.res_val / state.peak.clamp_min(1e-12)
    bucket = (rel * cfg.quantile_buckets).long().clamp(0, cfg.quantile_buckets - 1)
    bucket = bucket.masked_fill(~valid, -1)
    # rank within (latent, bucket) in reservoir order (random already)
    one_hot = torch.nn.functional.one_hot(bucket.clamp_min(0), cfg.quantile_buckets)
    one_hot = one_hot * valid[..., None]
    rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    picked = valid & (rank < cfg.per_bucket)
    return bucket.masked_fill(~picked, -1), rank, picked


def _in_top(state: _State, chunk: int = 4096) -> Tensor:
    """[R, n]: reservoir entry r of latent f is one of f's top contexts (chunks of latents
    bound the [R, N, chunk] comparison)."""
    out = torch.zeros(state.res_ctx.shape, dtype=torch.bool)
    for lo in range(0, state.n, chunk):
        cols = slice(lo, lo + chunk)
        top = state.top_ctx[:, cols].masked_fill(state.top_val[:, cols] <= 0, -2)
        out[:, cols] = (state.res_ctx[:, None, cols] == top[None]).any(1)
    return out


def checked_capture(sae: SparseAutoencoder, model_name: str, d_model: int, source: Path,
                    *, sae_label: str, acts_label: str) -> ActivationStore:
    """The capture at ``source``, checked to fit the SAE and the model (same d, shards
    intact) before a long analysis starts; the labels name the inputs in the errors (a CLI
    flag or a job field)."""
    if d_model != sae.cfg.d_in:
        raise ValueError(f"{sae_label} has d_in={sae.cfg.d_in} but {model_name} has "
                         f"d={d_model}: the SAE was not trained on this model")
    store = ActivationStore(Path(source))
    store.verify()
    if store.d_model != sae.cfg.d_in:
        raise ValueError(f"{acts_label} {source} has d={store.d_model}, the SAE "
                         f"d_in={sae.cfg.d_in}")
    if store.paired != sae.cfg.transcoder:
        raise ValueError(f"{acts_label} {source} holds " + (
            "an MLP's inputs and outputs, for a transcoder" if store.paired else
            "residual-stream activations") + f", but {sae_label} is " + (
            "a transcoder (it reads the MLP's input)" if sae.cfg.transcoder else
            "a residual-stream SAE"))
    return store


def analyse_capture(sae: SparseAutoencoder, store: ActivationStore, unembed: Tensor,
                    cfg: AnalysisConfig | None = None, *, max_tokens: int | None = None,
                    progress: bool = True,
                    on_chunk: Callable[[int, int], None] | None = None) -> AnalysisResult:
    """Analyse every latent of ``sae`` (raw-activation units) over ``store``'s rows.

    ``unembed`` [V, d] is the model's unembedding (``lm_head.weight``) for logit effects.
    ``on_chunk(tokens done, tokens in all)`` is called after each chunk (progress
    reporting; an exception raised there stops the analysis).
    """
    cfg = cfg or AnalysisConfig()
    sae.eval()
    n = sae.cfg.n_latents
    state = _State(n, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_context = store.manifest.rows_per_context
    limit = store.manifest.contexts if max_tokens is None else min(
        store.manifest.contexts, -(-max_tokens // per_context))
    bar = tqdm(total=limit * per_context, unit="tok", desc="analyse", disable=not progress)
    clock = _Clock()
    with bar:
        for first, acts in capture_chunks(store, chunk_size(cfg, per_context, n), limit):
            _update(state, acts, sae, first, gen)
            bar.update(acts.shape[0] * per_context)
            if on_chunk is not None:
                on_chunk(state.tokens, limit * per_context)
    if state.tokens == 0:
        raise ValueError("the capture holds no tokens to analyse")
    clock.lap("pass")
    examples = _examples(store, state)
    clock.lap("examples")
    logits = logit_effects(sae, unembed, cfg.logit_tokens)
    clock.lap("logit_effects")
    neighbours = decoder_neighbours(sae, cfg.neighbours)
    clock.lap("neighbours")
    return AnalysisResult(seconds=clock.laps,
        tokens=state.tokens, density=state.fired.double() / state.tokens,
        mean_activation=(state.total / state.fired.clamp_min(1)).float(),
        max_activation=state.peak, histogram_scale=state.hist.scale,
        histogram_counts=state.hist.counts, **logits, **neighbours, examples=examples,
        sinks=detect_sinks(state.peak, examples, cfg.window),
        cofiring=state.cofiring.result(cfg.cofire_partners))


class _Clock:
    """Wall seconds of each named phase."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now


def chunk_size(cfg: AnalysisConfig, per_context: int, n: int) -> int:
    """Contexts per chunk: the configured number, or one that bounds the memory."""
    return cfg.chunk_contexts or max(1, min(64, (1 << 25) // (per_context * n)))


def capture_chunks(store: ActivationStore, size: int, limit: int):
    """(first context index, activations [C, T−1, d]) over the first ``limit`` contexts."""
    per_context = store.manifest.rows_per_context
    done = 0
    for index in range(len(store.manifest.shards)):
        acts = store.shard(index).reshape(-1, per_context, store.d_model)
        for part in acts.split(size):
            if done >= limit:
                return
            part = part[: limit - done]
            yield done, part
            done += part.shape[0]


def _examples(store: ActivationStore, state: _State) -> ExampleSet:
    """The chosen top and quantile examples of every latent, from the windows the pass
    kept and the capture's token ids."""
    n, width = state.n, state.cfg.window
    bucket, rank, picked = _quantile_picks(state)
    top_slot, top_f = (state.top_val > 0).nonzero(as_tuple=True)
    res_slot, res_f = picked.nonzero(as_tuple=True)
    latent = torch.cat([top_f, res_f])
    context = torch.cat([state.top_ctx[top_slot, top_f], state.res_ctx[res_slot, res_f]])
    peak = torch.cat([state.top_pos[top_slot, top_f], state.res_pos[res_slot, res_f]])
    kind_bucket = torch.cat([torch.full_like(top_f, -1), bucket[res_slot, res_f]])
    order_rank = torch.cat([top_slot, rank[res_slot, res_f]])
    order = _lexsort([latent, kind_bucket, order_rank])
    latent, context, peak = latent[order], context[order], peak[order]
    tokens = store.tokens()[:, 1:].long()
    positions = tokens.shape[1]
    span = peak[:, None] + torch.arange(-width, width + 1)[None, :]
    inside = (span >= 0) & (span < positions)
    ids = tokens[context[:, None], span.clamp(0, positions - 1)].masked_fill(~inside, -1)
    return ExampleSet(latent=latent, bucket=kind_bucket[order], rank=order_rank[order],
                      context=context, position=peak + 1, tokens=ids,
                      activations=state.windows.lookup(context * n + latent))


def _lexsort(keys: list[Tensor]) -> Tensor:
    """Indices that sort by keys[0], then keys[1], ... (stable sorts from the last key)."""
    order = torch.arange(len(keys[0]))
    for key in reversed(keys):
        order = order[key[order].sort(stable=True).indices]
    return order
