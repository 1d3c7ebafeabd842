"""``saelab bench eval``: the evaluation's shared-prefix passes against three whole forward
passes, on the same batches, alternated batch by batch.

Both paths compute the same figures (checked: ``max_rel_diff``); only their cost differs.
The clean pass always runs the whole model; the shared path then runs blocks L+1.. and the
LM head twice (spliced, ablated) where the whole path runs the model twice more, so the
gain grows with how early block L is and shrinks with the LM head's share of the cost.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from training.bench.timing import timed
from training.data.models import LoadedModel
from training.sae.autoencoder import SparseAutoencoder
from training.train.metrics import dataset_batches, evaluate


def bench_eval(lm: LoadedModel, sae: SparseAutoencoder, layer: int, *, tokens: int = 4096,
               batch: int = 8, context: int = 128, dataset: str = "embedded"
               ) -> dict[str, Any]:
    """Tokens/s of ``evaluate`` with and without the shared prefix (medians over batches,
    after one warm-up batch of each) and the largest relative difference of their figures."""
    batches = list(dataset_batches(lm, dataset, tokens=tokens + batch * (context - 1),
                                   context=context, batch=batch))
    if len(batches) < 3:
        raise ValueError(f"--tokens {tokens}: too few for two timed batches of {batch}")
    times: dict[bool, list[float]] = {True: [], False: []}
    figures: dict[bool, list[dict]] = {True: [], False: []}
    for index, ids in enumerate(batches):
        for shared in (True, False):
            seconds, result = timed(lambda ids=ids, shared=shared: evaluate(
                lm, sae, layer, [ids], progress=False, share_prefix=shared))
            if index:
                times[shared].append(seconds / result.tokens)
                figures[shared].append(result.to_dict())
    rates = {shared: 1 / statistics.median(per_token) for shared, per_token in times.items()}
    return {"bench": "eval", "model": lm.name, "layer": layer, "n_layers": lm.n_layers,
            "n": sae.cfg.n_latents, "batch": batch, "context": context,
            "timed_batches": len(times[True]), "threads": torch.get_num_threads(),
            "device": str(lm.device), "whole_passes_tokens_per_s": rates[False],
            "shared_prefix_tokens_per_s": rates[True], "speedup": rates[True] / rates[False],
            "max_rel_diff": _max_rel_diff(figures[True], figures[False])}


def _max_rel_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for left, right in zip(a, b, strict=True):
        for name, value in left.items():
            other = right[name]
            worst = max(worst, abs(value - other) / max(abs(other), 1e-9))
    return worst
