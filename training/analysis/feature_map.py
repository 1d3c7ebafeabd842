"""A 2-D map of an SAE's latents from their decoder directions (UMAP, cosine metric), so
that latents writing similar directions sit together; the explorer draws it.

The neighbour graph UMAP starts from is computed exactly here (cosine similarities of the
unit decoder rows, in chunks of rows, top ``neighbours`` of each), and handed to
``umap-learn`` precomputed: that skips its approximate search, whose just-in-time
compilation alone took 40 s per process on 4,096 latents; the layout then takes about
10 s. With a fixed seed the layout is reproducible on one machine.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor


def decoder_map(w_dec: Tensor, *, seed: int = 0, neighbours: int = 15,
                chunk: int = 1024) -> Tensor:
    """[n, 2] positions of the latents' decoder rows ``w_dec`` [n, d]."""
    import umap

    n = w_dec.shape[0]
    if n < 4:
        raise ValueError(f"a map needs at least 4 latents (got {n})")
    rows = torch.nn.functional.normalize(w_dec.detach().float().cpu(), dim=1)
    k = min(neighbours, n - 1)
    ids, dists = _neighbour_graph(rows, k + 1, chunk)  # each row's own is the first
    reducer = umap.UMAP(n_neighbors=k + 1, min_dist=0.1, metric="cosine", init="random",
                        precomputed_knn=(ids, dists, None), random_state=seed, n_jobs=1)
    with warnings.catch_warnings():  # it warns that a precomputed graph cannot .transform()
        warnings.simplefilter("ignore", UserWarning)
        positions = reducer.fit_transform(rows.numpy())
    return torch.from_numpy(np.asarray(positions, dtype=np.float32))


def _neighbour_graph(rows: Tensor, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar rows of each row (itself included) and their cosine
    distances, as UMAP's ``precomputed_knn`` wants them."""
    ids, dists = [], []
    for start in range(0, rows.shape[0], chunk):
        top = (rows[start:start + chunk] @ rows.t()).topk(k, dim=1)
        ids.append(top.indices)
        dists.append((1 - top.values).clamp_min(0))
    return torch.cat(ids).numpy(), torch.cat(dists).numpy()
