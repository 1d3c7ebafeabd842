"""``saelab bench dead``: what the AuxK dead window does to dead latents.

The same SAE (same capture, seed, batches and lr) is trained without AuxK and with AuxK
at several dead windows (fractions of the run); each is then encoded over the same
held-out rows of the capture, which no run trained on. A latent that never fires on
those rows is dead there. AuxK is meant to lower that share; a window much shorter than
the run calls rare-but-live latents dead, and AuxK then trains them on the residual,
where they can end up firing less than without it. The table says which happens at this
size, so the default window is chosen from measurements, not folklore.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.data.activations import ActivationStore
from training.sae.autoencoder import SaeConfig
from training.sae.folder import load_sae
from training.train.run import heldout_stats, train
from training.train.trainer import TrainConfig

DEFAULT_WINDOWS = (0.1, 0.25, 0.5)
"""Dead windows as fractions of the run's tokens (0.5 is the default)."""


def bench_dead(acts: Path, work: Path, *, n_latents: int = 16_384, k: int = 16,
               batch: int = 4096, tokens: int = 98_304, holdout: int = 16_384,
               windows: tuple[float, ...] = DEFAULT_WINDOWS, seed: int = 0
               ) -> dict[str, Any]:
    """One run without AuxK, then one per window; dead share and FVU on held-out rows."""
    store = ActivationStore(acts)
    store.verify()
    holdout = min(holdout, len(store) // 10)  # what train() holds out: never trained on
    if len(store) < tokens + holdout:
        raise ValueError(f"{acts} holds {len(store)} rows; --tokens {tokens} plus "
                         f"--holdout {holdout} are needed")
    if any(not 0 < w <= 1 for w in windows):
        raise ValueError("--windows: each must be a fraction of the run in (0, 1]")
    base = SaeConfig(d_in=store.d_model, n_latents=n_latents, k=k)
    cfg = TrainConfig(batch=batch, tokens=tokens, seed=seed, checkpoint_every=0,
                      holdout_rows=holdout)
    rows = store.tail(holdout)
    variants: list[tuple[str, SaeConfig]] = [("no AuxK", replace(base, aux_coef=0.0))]
    variants += [(f"AuxK, window {w:g} of the run",
                  replace(base, dead_tokens=max(batch, int(w * tokens)))) for w in windows]
    runs = []
    for i, (name, sae_cfg) in enumerate(variants):
        started = time.perf_counter()
        train(acts, work / f"run-{i}", sae_cfg, cfg, progress=False)
        sae, _ = load_sae(work / f"run-{i}")
        stats = heldout_stats(sae, rows)
        runs.append({"variant": name, "aux_coef": sae_cfg.aux_coef,
                     "dead_tokens": sae_cfg.dead_tokens if sae_cfg.aux_coef else None,
                     "dead_share": stats["heldout_dead_fraction"],
                     "fvu": stats["heldout_fvu"], "seconds": time.perf_counter() - started})
    return {"bench": "dead", "acts": str(acts), "d": store.d_model, "n": n_latents, "k": k,
            "batch": batch, "tokens": tokens, "steps": tokens // batch,
            "heldout_rows": holdout, "seed": seed, "runs": runs}
