"""``saelab bench train``: tokens/s and held-out FVU of saelab's trainer against SAELens'
TopK trainer (``training.bench.saelens``; skipped with a notice when ``sae_lens`` is not
installed) on the same cached activation batches in the same order, with the same d, n, k,
batch, lr and fp32. Held-out figures of both SAEs come from the same code on the same rows.
The reference is a plain dense matmul of the encoder's shape: the encoder forward
(2·d·n FLOP per token) is the one dense product left, so ``matmul FLOP/s / (2·d·n)`` is
the throughput limit and ``flops_fraction`` says how close each trainer gets to it.

Like every benchmark here it measures side by side in one process, on the same inputs, so
that the ratios are meaningful on a noisy machine, and returns a flat JSON-able dict whose
last keys are the ratios.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any

import torch

from training.bench.timing import matmul_flops
from training.data.activations import ActivationStore
from training.sae.autoencoder import SaeConfig, SparseAutoencoder
from training.sae.folder import load_sae
from training.train.run import heldout_stats, train
from training.train.trainer import TrainConfig


def saelens_available() -> bool:
    return importlib.util.find_spec("sae_lens") is not None


def bench_train(acts: Path, work: Path, *, n_latents: int = 8192, k: int = 32,
                batch: int = 4096, tokens: int = 81_920, holdout: int = 8192,
                lr: float | None = None, seed: int = 0, with_saelens: bool = True
                ) -> dict[str, Any]:
    """saelab's trainer vs SAELens' on the capture ``acts`` (see the module docstring)."""
    store = ActivationStore(acts)
    store.verify()
    if len(store) < max(tokens + holdout, 10 * holdout):
        raise ValueError(f"{acts} holds {len(store)} rows; --tokens {tokens} plus "
                         f"{holdout} held-out rows (and at least 10x the held-out rows) "
                         "are needed")
    d = store.d_model
    sae_cfg = SaeConfig(d_in=d, n_latents=n_latents, k=k)
    train_cfg = TrainConfig(batch=batch, tokens=tokens, lr=lr, seed=seed, checkpoint_every=0,
                            holdout_rows=holdout)
    rate = train_cfg.learning_rate(n_latents)
    train_rows = len(store) - holdout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flops = matmul_flops(d, n_latents, batch, device)
    limit = flops / (2 * d * n_latents)
    result: dict[str, Any] = {
        "bench": "train", "d": d, "n": n_latents, "k": k, "batch": batch, "tokens": tokens,
        "holdout": holdout, "lr": rate, "threads": torch.get_num_threads(),
        "device": str(device), "matmul_gflops": flops / 1e9, "dense_limit_tokens_per_s": limit}
    heldout = store.tail(holdout)

    metrics = train(acts, work / "saelab", sae_cfg, train_cfg, progress=False)
    ours_sae, _ = load_sae(work / "saelab", device)
    ours = {"tokens_per_s": metrics["tokens_per_s"], **heldout_stats(ours_sae, heldout)}
    ours["flops_fraction"] = ours["tokens_per_s"] / limit
    result["saelab"] = ours

    if not with_saelens or not saelens_available():
        result["saelens"] = {"skipped": "sae_lens is not installed: pip install "
                             "'saelab[bench]' (or bash scripts/setup.sh --bench) to compare"}
        return result
    theirs = _saelens_run(store, train_rows, sae_cfg, batch, tokens, rate, seed, device)
    theirs.update(heldout_stats(theirs.pop("sae").to(device), heldout))
    theirs["flops_fraction"] = theirs["tokens_per_s"] / limit
    result["saelens"] = theirs
    result["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    result["fvu_ratio"] = ours["heldout_fvu"] / theirs["heldout_fvu"]
    return result


def _saelens_run(store: ActivationStore, train_rows: int, sae_cfg: SaeConfig, batch: int,
                 tokens: int, lr: float, seed: int, device: torch.device) -> dict[str, Any]:
    """SAELens' trainer on the batches saelab's trainer saw, in the same order."""
    from training.bench.saelens import saelens_topk_throughput

    stream = store.iter_shuffled(batch, seed=seed, limit_rows=train_rows)
    acts = torch.cat(list(itertools.islice(stream, tokens // batch)))
    run = saelens_topk_throughput(acts, sae_cfg.n_latents, sae_cfg.k, batch, lr, seed,
                                  device=str(device))
    state = run.pop("sae_state")
    sae = SparseAutoencoder(sae_cfg)
    sae.load_state_dict({"w_enc": state["W_enc"].t(), "b_enc": state["b_enc"],
                         "w_dec": state["W_dec"], "b_dec": state["b_dec"],
                         "threshold": torch.tensor(0.0)})
    return {"tokens_per_s": run["tokens_per_s"], "version": run["sae_lens_version"],
            "sae": sae}


