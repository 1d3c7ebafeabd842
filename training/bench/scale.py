"""``saelab bench llama32``: capture and training on the full Llama-3.2-1B (or -3B) shape.

The model has Llama 3.2's architecture and tokenizer with random weights (see
``training.bench.llama32``): the speed and memory of a forward pass do not depend on the
weights' values, so capture's tokens/s and peak memory are those the real checkpoint
would give on this machine. The SAE is then trained on that capture (several passes when
the capture is short, since only throughput is measured here), and its throughput is set
against the dense limit of the encoder's matmul, as in ``bench train``.
"""

from __future__ import annotations

import gc
import resource
import time
from pathlib import Path
from typing import Any

import torch

from training.bench.llama32 import random_llama32
from training.bench.timing import matmul_flops
from training.data.capture import CaptureConfig, capture
from training.data.models import default_device
from training.sae.autoencoder import SaeConfig
from training.train.run import train
from training.train.trainer import TrainConfig


def bench_llama32(work: Path, *, shape: str = "1b", layer: int = 8, tokens: int = 8192,
                  train_tokens: int = 65_536, latents: int = 16_384, k: int = 32,
                  batch: int = 4096, device: str | None = None,
                  narrow: dict[str, int] | None = None) -> dict[str, Any]:
    """Capture ``tokens`` rows of block ``layer``, then train ``train_tokens`` on them.
    ``narrow`` (``layers``, ``hidden``) shrinks the model, for tests of this code."""
    device = torch.device(device) if device else default_device()
    started = time.perf_counter()
    lm = random_llama32(shape, device=device, **(narrow or {}))
    params = sum(p.numel() for p in lm.model.parameters())
    lm.check_layer(layer)
    build_s = time.perf_counter() - started
    d_model = lm.d_model
    started = time.perf_counter()
    capture(lm, CaptureConfig(layer=layer, tokens=tokens, dtype="fp32", batch_contexts=8),
            work / "acts", progress=False)
    capture_s = time.perf_counter() - started
    capture_peak = _peak_gib(device)
    del lm
    gc.collect()
    _reset_peak(device)
    started = time.perf_counter()
    metrics = train(work / "acts", work / "sae", SaeConfig(d_in=d_model, n_latents=latents, k=k),
                    TrainConfig(batch=batch, tokens=train_tokens, checkpoint_every=0,
                                holdout_rows=min(4096, tokens // 10)), progress=False)
    train_s = time.perf_counter() - started
    dense = _dense_limit(d_model, latents, device)
    train_rate = train_tokens / train_s
    return {"bench": "llama32", "shape": shape, "params": params, "d_model": d_model,
            "layer": layer, "device": str(device), "threads": torch.get_num_threads(),
            "build_s": build_s,
            "capture": {"tokens": tokens, "seconds": capture_s,
                        "tokens_per_s": tokens / capture_s, "peak_gib": capture_peak},
            "train": {"tokens": train_tokens, "n": latents, "k": k, "batch": batch,
                      "seconds": train_s, "tokens_per_s": train_rate,
                      "peak_gib": _peak_gib(device), "heldout_fvu": metrics.get("heldout_fvu"),
                      "dense_limit_tokens_per_s": dense["tokens_per_s"],
                      "matmul_gflops": dense["gflops"],
                      "flops_fraction": train_rate / dense["tokens_per_s"]}}


def _dense_limit(d: int, n: int, device: torch.device) -> dict[str, float]:
    """The encoder's dense matmul (2·d·n FLOP per token) at this device's matmul speed."""
    flops = matmul_flops(d, n, 4096, device, repeats=5)
    return {"gflops": flops / 1e9, "tokens_per_s": flops / (2 * d * n)}


def _peak_gib(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocator on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
