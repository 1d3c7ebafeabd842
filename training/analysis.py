"""Per-latent analysis of an SAE over a capture: one streaming pass, every latent at once.

Pass 1 reads the capture chunk by chunk (C contexts × (T−1) positions) and keeps, per
latent, only fixed-size state — memory is O(n × examples), never O(tokens):

* firing count, activation sum and max (``index_add_`` / ``scatter_reduce_`` over the
  sparse codes);
* a histogram over log-spaced bins of the activation (fixed edges, so chunks just add);
* the top-N contexts by their peak activation (per-context max over positions, then a
  running top-k over contexts of [C, n] merged with the kept [N, n]);
* a uniform sample of the contexts where the latent fired (each firing context gets a
  random priority; a running top-k of priorities is a reservoir sample) from which the
  quantile examples are drawn once the max is known.

Pass 2 revisits only the chosen contexts, re-encodes them and cuts a ±W-token window
around each peak with the latent's activation on every token. Logit effects are
W_dec[f] · W_U (the unembedding), decoder neighbours the cosine similarity of decoder rows;
both are computed in chunks of latents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from training.activations import ActivationStore
from training.sae import SparseAutoencoder


@dataclass
class AnalysisConfig:
    top_examples: int = 20
    """Top contexts kept per latent."""
    quantile_buckets: int = 10
    per_bucket: int = 5
    window: int = 16
    """Tokens each side of the peak in an example."""
    histogram_bins: int = 40
    histogram_range: tuple[float, float] = (1e-3, 1e3)
    """Log-spaced bin edges span this range (relative to raw activation units)."""
    logit_tokens: int = 10
    neighbours: int = 10
    reservoir: int = 100
    """Firing contexts sampled per latent for the quantile examples."""
    chunk_contexts: int = 16
    seed: int = 0


@dataclass
class LatentExample:
    kind: str
    """``top`` or ``quantile``."""
    bucket: int | None
    rank: int
    context_index: int
    position: int
    tokens: list[int]
    activations: list[float]


@dataclass
class AnalysisResult:
    """Everything the store keeps about each latent, as arrays over latents [n, ...]."""

    tokens: int
    density: Tensor
    mean_activation: Tensor
    max_activation: Tensor
    histogram_edges: Tensor
    histogram_counts: Tensor
    top_logits: Tensor
    top_logit_ids: Tensor
    bottom_logits: Tensor
    bottom_logit_ids: Tensor
    neighbour_ids: Tensor
    neighbour_cosines: Tensor
    examples: list[list[LatentExample]] = field(default_factory=list)


class _State:
    """The running per-latent state of pass 1: fixed size, whatever the token count."""

    def __init__(self, n: int, cfg: AnalysisConfig, edges: Tensor) -> None:
        self.n, self.cfg, self.edges, self.tokens = n, cfg, edges, 0
        self.fired = torch.zeros(n, dtype=torch.long)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.peak = torch.zeros(n)
        self.hist = torch.zeros(n * cfg.histogram_bins, dtype=torch.long)
        self.top_val = torch.zeros(cfg.top_examples, n)
        self.top_ctx = torch.full((cfg.top_examples, n), -1, dtype=torch.long)
        self.top_pos = torch.zeros(cfg.top_examples, n, dtype=torch.long)
        self.res_key = torch.full((cfg.reservoir, n), -1.0)
        self.res_ctx = torch.full((cfg.reservoir, n), -1, dtype=torch.long)
        self.res_pos = torch.zeros(cfg.reservoir, n, dtype=torch.long)
        self.res_val = torch.zeros(cfg.reservoir, n)


def _running_top(keys: Tensor, extras: list[Tensor], new_keys: Tensor,
                 new_extras: list[Tensor], width: int) -> tuple[Tensor, list[Tensor]]:
    """Merge kept [w, n] with new [C, n] columns-wise; keep the ``width`` largest keys."""
    merged = torch.cat([keys, new_keys])
    top = merged.topk(width, dim=0)
    return top.values, [torch.cat([a, b]).gather(0, top.indices)
                        for a, b in zip(extras, new_extras, strict=True)]


@torch.no_grad()
def _encode(sae: SparseAutoencoder, acts: Tensor) -> Tensor:
    """Dense codes [C, T−1, n] of activations [C, T−1, d]."""
    flat = acts.reshape(-1, acts.shape[-1]).float().to(sae.b_dec.device)
    return sae.dense_latents(flat).cpu().reshape(*acts.shape[:2], -1)


def _update(state: _State, z: Tensor, first_context: int, gen: torch.Generator) -> None:
    """Fold one chunk of codes z [C, P, n] into the running state."""
    cfg, n = state.cfg, state.n
    flat = z.reshape(-1, n)
    active = flat > 0
    state.tokens += flat.shape[0]
    state.fired += active.sum(0)
    state.total += flat.sum(0).double()
    state.peak = torch.maximum(state.peak, flat.max(0).values)
    rows, cols = active.nonzero(as_tuple=True)
    values = flat[rows, cols]
    bins = torch.bucketize(values.log10(), state.edges.log10()[1:-1])
    state.hist.index_add_(0, cols * cfg.histogram_bins + bins, torch.ones_like(bins))

    ctx_max, ctx_pos = z.max(dim=1)  # [C, n]: each context's peak and where it is
    ctx_ids = torch.arange(first_context, first_context + z.shape[0])[:, None].expand(-1, n)
    state.top_val, (state.top_ctx, state.top_pos) = _running_top(
        state.top_val, [state.top_ctx, state.top_pos], ctx_max, [ctx_ids, ctx_pos],
        cfg.top_examples)
    keys = torch.rand(ctx_max.shape, generator=gen).masked_fill(ctx_max <= 0, -1.0)
    state.res_key, (state.res_ctx, state.res_pos, state.res_val) = _running_top(
        state.res_key, [state.res_ctx, state.res_pos, state.res_val], keys,
        [ctx_ids, ctx_pos, ctx_max], cfg.reservoir)


def _quantile_picks(state: _State) -> tuple[Tensor, Tensor, Tensor]:
    """From the reservoir [R, n], up to ``per_bucket`` contexts per activation decile of
    each latent's max: bucket [R, n] (−1 = not picked), rank within the bucket [R, n]
    and the picked mask [R, n]."""
    cfg = state.cfg
    valid = state.res_key >= 0
    rel = state.res_val / state.peak.clamp_min(1e-12)
    bucket = (rel * cfg.quantile_buckets).long().clamp(0, cfg.quantile_buckets - 1)
    bucket = bucket.masked_fill(~valid, -1)
    # rank within (latent, bucket) in reservoir order (random already)
    one_hot = torch.nn.functional.one_hot(bucket.clamp_min(0), cfg.quantile_buckets)
    one_hot = one_hot * valid[..., None]
    rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    picked = valid & (rank < cfg.per_bucket)
    return bucket.masked_fill(~picked, -1), rank, picked


def analyse_capture(sae: SparseAutoencoder, store: ActivationStore, unembed: Tensor,
                    cfg: AnalysisConfig | None = None, *, max_tokens: int | None = None,
                    progress: bool = True) -> AnalysisResult:
    """Analyse every latent of ``sae`` (raw-activation units) over ``store``'s rows.

    ``unembed`` [V, d] is the model's unembedding (``lm_head.weight``) for logit effects.
    """
    cfg = cfg or AnalysisConfig()
    sae.eval()
    n = sae.cfg.n_latents
    low, high = cfg.histogram_range
    edges = torch.logspace(torch.tensor(low).log10(), torch.tensor(high).log10(),
                           cfg.histogram_bins + 1)
    state = _State(n, cfg, edges)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_context = store.manifest.rows_per_context
    limit = store.manifest.contexts if max_tokens is None else min(
        store.manifest.contexts, -(-max_tokens // per_context))
    bar = tqdm(total=limit * per_context, unit="tok", desc="analyse", disable=not progress)
    with bar:
        for first, acts in _chunks(store, cfg.chunk_contexts, limit):
            _update(state, _encode(sae, acts), first, gen)
            bar.update(acts.shape[0] * per_context)
    if state.tokens == 0:
        raise ValueError("the capture holds no tokens to analyse")
    examples = _examples(sae, store, state)
    logits = _logit_effects(sae, unembed, cfg.logit_tokens)
    neighbours = _neighbours(sae, cfg.neighbours)
    return AnalysisResult(
        tokens=state.tokens, density=state.fired.double() / state.tokens,
        mean_activation=(state.total / state.fired.clamp_min(1)).float(),
        max_activation=state.peak, histogram_edges=edges,
        histogram_counts=state.hist.reshape(n, cfg.histogram_bins), **logits, **neighbours,
        examples=examples)


def _chunks(store: ActivationStore, size: int, limit: int):
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


def _examples(sae: SparseAutoencoder, store: ActivationStore, state: _State
              ) -> list[list[LatentExample]]:
    """Pass 2: windows around the chosen peaks, grouped by context so each is encoded once."""
    cfg, n = state.cfg, state.n
    bucket, rank, picked = _quantile_picks(state)
    wanted: dict[int, list[tuple[int, str, int | None, int, int]]] = {}
    top_ok = state.top_val > 0
    for r, f in top_ok.nonzero().tolist():
        wanted.setdefault(int(state.top_ctx[r, f]), []).append(
            (f, "top", None, r, int(state.top_pos[r, f])))
    for r, f in picked.nonzero().tolist():
        wanted.setdefault(int(state.res_ctx[r, f]), []).append(
            (f, "quantile", int(bucket[r, f]), int(rank[r, f]), int(state.res_pos[r, f])))
    out: list[list[LatentExample]] = [[] for _ in range(n)]
    tokens = store.tokens()
    for context, z in _encoded_contexts(sae, store, sorted(wanted), cfg.chunk_contexts):
        ids = tokens[context, 1:].tolist()
        picks = wanted[context]
        windows = _windows(z, [p[0] for p in picks], [p[4] for p in picks], cfg.window)
        for (f, kind, bkt, rnk, pos), acts in zip(picks, windows, strict=True):
            lo, hi = max(0, pos - cfg.window), min(len(ids), pos + cfg.window + 1)
            start = lo - (pos - cfg.window)
            out[f].append(LatentExample(kind, bkt, rnk, context, pos + 1, ids[lo:hi],
                                        acts[start:start + hi - lo]))
    for examples in out:
        examples.sort(key=lambda e: (e.kind != "top", e.bucket or 0, e.rank))
    return out


def _windows(z: Tensor, latents: list[int], peaks: list[int], width: int) -> list[list[float]]:
    """Activations of each (latent, peak) over peak ± width in codes z [P, n], zero-padded
    at the context's ends: [m][2·width+1] (only these leave the tensor, not whole columns)."""
    padded = torch.nn.functional.pad(z[:, latents], (0, 0, width, width))  # [P+2w, m]
    offsets = torch.arange(2 * width + 1)[:, None] + torch.tensor(peaks)[None, :]
    return padded.gather(0, offsets).t().tolist()


def _encoded_contexts(sae: SparseAutoencoder, store: ActivationStore, contexts: list[int],
                      batch: int):
    """(context, codes [T−1, n]) for the sorted ``contexts``: each shard is read once and
    its wanted contexts are encoded ``batch`` at a time."""
    per_context = store.manifest.rows_per_context
    offsets = store.shard_offsets()
    position = 0
    for shard in range(len(store.manifest.shards)):
        first, last = offsets[shard] // per_context, offsets[shard + 1] // per_context
        here = []
        while position < len(contexts) and contexts[position] < last:
            here.append(contexts[position])
            position += 1
        if not here:
            continue
        acts = store.shard(shard).reshape(-1, per_context, store.d_model)
        for start in range(0, len(here), batch):
            group = here[start:start + batch]
            codes = _encode(sae, acts[[c - first for c in group]])
            yield from zip(group, codes, strict=True)


@torch.no_grad()
def _logit_effects(sae: SparseAutoencoder, unembed: Tensor, count: int,
                   chunk: int = 1024) -> dict[str, Tensor]:
    """Top/bottom ``count`` entries of W_dec[f] · W_Uᵀ per latent: [n, count] each."""
    w_u = unembed.float().to(sae.w_dec.device)
    parts: dict[str, list[Tensor]] = {"top_logits": [], "top_logit_ids": [],
                                      "bottom_logits": [], "bottom_logit_ids": []}
    for rows in sae.w_dec.split(chunk):
        effects = rows.float() @ w_u.t()
        top, bottom = effects.topk(count, dim=1), (-effects).topk(count, dim=1)
        parts["top_logits"].append(top.values.cpu())
        parts["top_logit_ids"].append(top.indices.cpu())
        parts["bottom_logits"].append(-bottom.values.cpu())
        parts["bottom_logit_ids"].append(bottom.indices.cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


@torch.no_grad()
def _neighbours(sae: SparseAutoencoder, count: int, chunk: int = 1024) -> dict[str, Tensor]:
    """The ``count`` decoder rows most cosine-similar to each latent's: [n, count]."""
    w = sae.w_dec.float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    count = min(count, w.shape[0] - 1)
    ids, cos = [], []
    for start in range(0, w.shape[0], chunk):
        sims = w[start:start + chunk] @ w.t()
        own = torch.arange(start, start + sims.shape[0], device=w.device)
        sims[torch.arange(sims.shape[0]), own] = -2.0
        top = sims.topk(count, dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return {"neighbour_ids": torch.cat(ids), "neighbour_cosines": torch.cat(cos)}
