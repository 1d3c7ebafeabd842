"""Synthetic activation captures with a known sparse structure, for trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from training.data.activations import Manifest, shard_name


def sparse_rows(rows: int, d: int, *, atoms: int = 48, active: int = 3, seed: int = 0
                ) -> torch.Tensor:
    """[rows, d]: each row an offset plus ``active`` of ``atoms`` random unit directions
    with positive magnitudes — data a TopK SAE can reconstruct almost exactly."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(rows, atoms, generator=g).argsort(dim=1)[:, :active]
    magnitudes = 1 + 2 * torch.rand(rows, active, generator=g)
    x = torch.einsum("ra,rad->rd", magnitudes, dictionary[chosen])
    return x + 3.0 * torch.ones(d) / d**0.5


def write_capture(directory: Path, acts: torch.Tensor, *, context: int = 17,
                  shard_contexts: int = 40, model: str = "synthetic", layer: int = 0
                  ) -> Manifest:
    """Write ``acts`` [rows, d] (rows a multiple of context − 1) as a capture directory."""
    per_context = context - 1
    contexts = acts.shape[0] // per_context
    acts = acts[: contexts * per_context].contiguous()
    directory.mkdir(parents=True)
    manifest = Manifest(model=model, layer=layer, d_model=acts.shape[1], dtype="fp32",
                        context=context, dataset="synthetic", contexts=contexts)
    for index, start in enumerate(range(0, contexts, shard_contexts)):
        n = min(shard_contexts, contexts - start)
        rows = acts[start * per_context:(start + n) * per_context].clone()
        tokens = torch.randint(4, 100, (n, context), dtype=torch.int32)
        tokens[:, 0] = 1
        save_file({"activations": rows, "tokens": tokens}, str(directory / shard_name(index)))
        manifest.shards.append(rows.shape[0])
    manifest.rows = sum(manifest.shards)
    manifest.save(directory)
    return manifest
