"""``saelab bench precision``: bf16 against fp32, for capture and for training.

Capture: the same model loaded in fp32 and in bf16 runs the same batches up to block L
(alternated, medians); the bf16 activations' error is measured against the fp32 ones
(relative Frobenius norm, and the cosine of each row). Training: the same SAE on the same
batches with the encoder's matmul in fp32 and in bf16 (fp32 weights and optimiser in
both); tokens/s and held-out FVU, which is computed in fp32 for both.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from training.bench.capture import _chunks
from training.bench.timing import timed
from training.data.corpus import iter_texts
from training.data.hooks import block_output
from training.data.models import LoadedModel
from training.data.packing import pack_contexts
from training.sae.autoencoder import SaeConfig
from training.train.run import train
from training.train.trainer import TrainConfig


def bench_capture_precision(fp32: LoadedModel, bf16: LoadedModel, *, layer: int,
                            batches: int = 4, batch: int = 8, context: int = 128
                            ) -> dict[str, Any]:
    """Tokens/s of both and the bf16 activations' error (first batch a warm-up)."""
    stream = pack_contexts(iter_texts("embedded"), fp32.tokenizer, context, fp32.bos_id)
    groups = [torch.tensor(g) for g in _chunks(stream, batch, batches + 1)]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    errors, cosines = [], []
    for index, ids in enumerate(groups):
        t32, exact = timed(lambda ids=ids: block_output(fp32.model, fp32.blocks, layer, ids))
        t16, rough = timed(lambda ids=ids: block_output(bf16.model, bf16.blocks, layer, ids))
        exact, rough = exact[:, 1:].float(), rough[:, 1:].float()
        errors.append(float((rough - exact).norm() / exact.norm()))
        cosines.append(torch.nn.functional.cosine_similarity(rough, exact, dim=-1).flatten())
        if index:
            times["fp32"].append(t32)
            times["bf16"].append(t16)
    tokens = batch * context
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    cos = torch.cat(cosines)
    return {"layer": layer, "fp32_tokens_per_s": rates["fp32"],
            "bf16_tokens_per_s": rates["bf16"], "speedup": rates["bf16"] / rates["fp32"],
            "relative_error": statistics.mean(errors), "min_row_cosine": float(cos.min()),
            "median_row_cosine": float(cos.median())}


def bench_train_precision(acts: Path, work: Path, *, n_latents: int = 8192, k: int = 32,
                          batch: int = 4096, tokens: int = 65_536) -> dict[str, Any]:
    """The same run in fp32 and with the encoder's matmul in bf16."""
    from training.data.activations import ActivationStore

    d = ActivationStore(acts).d_model
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train(acts, work / precision, SaeConfig(d_in=d, n_latents=n_latents,
                                                                   k=k),
                                TrainConfig(batch=batch, tokens=tokens, checkpoint_every=0,
                                            precision=precision), progress=False)
    return {"n": n_latents, "k": k, "batch": batch, "tokens": tokens,
            **{f"{p}_tokens_per_s": m["tokens_per_s"] for p, m in runs.items()},
            **{f"{p}_heldout_fvu": m["heldout_fvu"] for p, m in runs.items()},
            "speedup": runs["bf16"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"]}
