"""``saelab bench analysis``: whole-analysis tokens/s against plain SAE encoding of the
same chunks."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from training.analysis.latents import AnalysisConfig, analyse_capture, capture_chunks, chunk_size
from training.data.activations import ActivationStore
from training.sae.autoencoder import SparseAutoencoder


def bench_analysis(sae: SparseAutoencoder, store: ActivationStore, unembed: Tensor, *,
                   tokens: int) -> dict[str, Any]:
    """Whole-analysis tokens/s (the pass over the capture, examples, logit effects,
    neighbours) vs plain sparse SAE encoding (``sae.encode``) of the same chunks."""
    cfg = AnalysisConfig()
    per_context = store.manifest.rows_per_context
    contexts = min(store.manifest.contexts, -(-tokens // per_context))
    start = time.perf_counter()
    with torch.no_grad():
        for _, acts in capture_chunks(store, chunk_size(cfg, per_context, sae.cfg.n_latents),
                                  contexts):
            sae.encode(acts.reshape(-1, acts.shape[-1]).float().to(sae.b_dec.device))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    result = analyse_capture(sae, store, unembed, cfg, max_tokens=tokens, progress=False)
    analysis_s = time.perf_counter() - start
    encode_tps, analysis_tps = result.tokens / encode_s, result.tokens / analysis_s
    return {"bench": "analysis", "n": sae.cfg.n_latents, "tokens": result.tokens,
            "threads": torch.get_num_threads(), "encode_tokens_per_s": encode_tps,
            "analysis_tokens_per_s": analysis_tps, "seconds": result.seconds,
            "pass_ratio": encode_s / result.seconds["pass"], "ratio": analysis_tps / encode_tps}


