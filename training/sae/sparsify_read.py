"""Reading SAE folders written by EleutherAI's sparsify (``SparseCoder.save_to_disk``).

A folder holds ``cfg.json`` (``num_latents`` or ``expansion_factor``, ``k``,
``activation``, ``transcode``, ``skip_connection``, ``d_in``) and ``sae.safetensors``
with ``encoder.weight`` [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d] and ``b_dec`` [d].
Its encoder is ``TopK_k(ReLU(encoder(x − b_dec)))`` and its decoder ``z·W_dec + b_dec``:
saelab's TopK SAE exactly. A trainer saves one such folder per hookpoint, named after it
(``layers.6`` = the output of decoder block 6, the residual stream saelab reads), and the
model it trained on in the parent folder's ``config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

SPARSIFY_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
_HOOKPOINT = re.compile(r"^(?:model\.)?layers\.(\d+)$")


def is_sparsify(tensors: dict[str, torch.Tensor]) -> bool:
    return "encoder.weight" in tensors


def convert_sparsify_sae(raw_cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                         folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(saelab cfg, tensors in SAELens' names) of a sparsify folder; ValueError for what
    saelab cannot run (transcoders, skip connections, group-max activations)."""
    for key, why in (("transcode", "it is a transcoder"),
                     ("skip_connection", "it has a skip connection")):
        if raw_cfg.get(key):
            raise ValueError(f"this sparsify SAE cannot be read: {why}")
    if raw_cfg.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {raw_cfg.get('activation')!r} is not "
                         "supported (only topk)")
    missing = [name for name in SPARSIFY_KEYS if name not in tensors]
    if missing:
        raise ValueError(f"sparsify weights lack {', '.join(missing)}")
    w_enc = tensors["encoder.weight"].float()
    n, d = w_enc.shape
    k = int(raw_cfg.get("k") or 0)
    if not 1 <= k <= n:
        raise ValueError(f"sparsify cfg needs k in [1, {n}] (got {raw_cfg.get('k')!r})")
    cfg: dict[str, Any] = {"architecture": "topk", "d_in": d, "d_sae": n, "k": k,
                           "threshold": None, "dtype": "float32", "source_format": "sparsify",
                           "model_name": _trained_model(folder)}
    layer = _hook_layer(folder.name)
    if layer is not None:
        cfg["hook_layer"], cfg["hook_name"] = layer, f"blocks.{layer}.hook_resid_post"
    out = {"W_enc": w_enc.t().contiguous(), "b_enc": tensors["encoder.bias"].float(),
           "W_dec": tensors["W_dec"].float().contiguous(), "b_dec": tensors["b_dec"].float()}
    return cfg, out


def _hook_layer(name: str) -> int | None:
    match = _HOOKPOINT.match(name)
    return int(match.group(1)) if match else None


def _trained_model(folder: Path) -> str | None:
    """The model in the training run's ``config.json`` beside the hookpoint folders."""
    try:
        run = json.loads((folder.parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model = run.get("model") if isinstance(run, dict) else None
    return model if isinstance(model, str) else None
