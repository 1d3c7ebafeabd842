"""``saelab bench sweep``: a sweep of SAEs from one read against the same SAEs trained one
run at a time, on the same capture (or straight from the model: the same stream), batches
and seed (so both write the same SAEs: the figures' largest difference is reported beside
the wall times)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from training.data.activations import ActivationStore
from training.data.capture import CaptureConfig
from training.data.models import LoadedModel
from training.sae.autoencoder import SaeConfig
from training.train.run import train
from training.train.stream import StreamConfig, train_streaming
from training.train.stream_sweep import train_layer_sweep
from training.train.sweep import sweep_configs, train_sweep
from training.train.trainer import TrainConfig


def bench_sweep(acts: Path, work: Path, *, latents: list[int], ks: list[int],
                architectures: list[str], batch: int = 4096, tokens: int = 65_536
                ) -> dict[str, Any]:
    """Wall time of one sweep and of the separate runs, and their held-out FVUs."""
    store = ActivationStore(acts)
    configs = sweep_configs(SaeConfig(d_in=store.d_model, n_latents=max(latents), k=min(ks)),
                            latents, ks, architectures)
    cfg = TrainConfig(batch=batch, tokens=tokens, checkpoint_every=0)
    started = time.perf_counter()
    swept = train_sweep(acts, {work / "sweep" / name: c for name, c in configs.items()}, cfg,
                        progress=False)
    sweep_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = [train(acts, work / "alone" / name, c, cfg, progress=False)
             for name, c in configs.items()]
    alone_s = time.perf_counter() - started
    return {"bench": "sweep", "acts": str(acts), "d": store.d_model, "saes": list(configs),
            "batch": batch, "tokens": tokens, **_figures(list(configs), swept, alone,
                                                         sweep_s, alone_s)}


def bench_stream_sweep(lm: LoadedModel, work: Path, *, layers: list[int], latents: list[int],
                       ks: list[int], architectures: list[str], batch: int = 4096,
                       tokens: int = 65_536, buffer_rows: int = 1 << 16) -> dict[str, Any]:
    """The same, straight from the model: one streaming sweep of every combination at
    every block (one forward per batch of contexts, up to the deepest, for all) against
    a streaming run per SAE (its forwards again for each)."""
    configs = sweep_configs(SaeConfig(d_in=lm.d_model, n_latents=max(latents), k=min(ks)),
                            latents, ks, architectures)
    cfg = TrainConfig(batch=batch, tokens=tokens, checkpoint_every=0)
    stream = StreamConfig(CaptureConfig(layer=layers[0], tokens=tokens, dtype="fp32"),
                          buffer_rows=buffer_rows)
    names = [f"L{layer}/{name}" if len(layers) > 1 else name for layer in layers
             for name in configs]
    started = time.perf_counter()
    swept = train_layer_sweep(lm, {layer: {work / "sweep" / f"L{layer}" / name: c
                                           for name, c in configs.items()}
                                   for layer in layers}, cfg, stream, progress=False)
    sweep_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = [train_streaming(lm, work / "alone" / f"L{layer}" / name, c, cfg,
                             replace(stream, capture=replace(stream.capture, layer=layer)),
                             progress=False)
             for layer in layers for name, c in configs.items()]
    alone_s = time.perf_counter() - started
    return {"bench": "sweep", "streamed": True, "model": lm.name, "layers": layers,
            "d": lm.d_model, "saes": names, "batch": batch, "tokens": tokens,
            "buffer_rows": buffer_rows, **_figures(names, swept, alone, sweep_s, alone_s)}


def _figures(names: list[str], swept: list[dict], alone: list[dict], sweep_s: float,
             alone_s: float) -> dict[str, Any]:
    """Both wall times, their ratio, and each SAE's held-out FVU with the largest
    difference between its sweep and separate figures."""
    diff = max(abs(a["heldout_fvu"] - b["heldout_fvu"]) for a, b in zip(swept, alone,
                                                                         strict=True))
    return {"threads": torch.get_num_threads(), "sweep_s": sweep_s, "separate_s": alone_s,
            "ratio": sweep_s / alone_s,
            "heldout_fvu": {name: m["heldout_fvu"] for name, m in zip(names, swept,
                                                                      strict=True)},
            "max_fvu_difference": diff}
