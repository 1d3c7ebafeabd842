"""``saelab bench stream``: training straight from the model against capturing to disk
and then training, on the same tokens of the same dataset (wall time of each, and the
held-out FVU of both SAEs; the two see the tokens in different orders)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from training.data.capture import CaptureConfig, capture
from training.data.models import LoadedModel
from training.sae.autoencoder import SaeConfig
from training.train.run import train
from training.train.stream import StreamConfig, train_streaming
from training.train.trainer import TrainConfig


def bench_stream(lm: LoadedModel, work: Path, *, layer: int, tokens: int = 65_536,
                 n_latents: int = 4096, k: int = 32, batch: int = 4096,
                 buffer_rows: int = 1 << 16) -> dict[str, Any]:
    holdout = 8192
    sae_cfg = SaeConfig(d_in=lm.d_model, n_latents=n_latents, k=k)
    cfg = TrainConfig(batch=batch, tokens=tokens, checkpoint_every=0, holdout_rows=holdout)
    started = time.perf_counter()
    capture(lm, CaptureConfig(layer=layer, tokens=tokens + holdout, dtype="fp32"),
            work / "acts", progress=False)
    captured_s = time.perf_counter() - started
    on_disk = train(work / "acts", work / "sae-disk", sae_cfg, cfg, progress=False)
    two_step_s = time.perf_counter() - started
    started = time.perf_counter()
    streamed = train_streaming(lm, work / "sae-stream", sae_cfg, cfg, StreamConfig(
        CaptureConfig(layer=layer, tokens=tokens, dtype="fp32"), buffer_rows=buffer_rows),
        progress=False)
    stream_s = time.perf_counter() - started
    return {"bench": "stream", "model": lm.name, "layer": layer, "tokens": tokens,
            "n": n_latents, "k": k, "batch": batch, "buffer_rows": buffer_rows,
            "threads": torch.get_num_threads(), "capture_s": captured_s,
            "capture_then_train_s": two_step_s, "streaming_s": stream_s,
            "capture_then_train_tokens_per_s": tokens / two_step_s,
            "streaming_tokens_per_s": tokens / stream_s, "ratio": stream_s / two_step_s,
            "heldout_fvu_disk": on_disk["heldout_fvu"],
            "heldout_fvu_stream": streamed["heldout_fvu"]}
