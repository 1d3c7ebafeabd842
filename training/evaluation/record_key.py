"""The name of a recorded clean pass: a hash of everything its contents depend on.

A record (``training.evaluation.records``) may only be read by an evaluation that would
compute exactly what it holds, so its name hashes:

* every parameter and buffer of the model (names, dtypes, shapes and bytes), its class,
  config and attention implementation;
* the torch and transformers versions, the device type (and a GPU's name: another GPU
  rounds differently);
* the source of this package and of the block hooks, so that a later saelab whose
  evaluation computes anything differently never reads an older record;
* the block, the site, and each batch's token ids and shape (their batching).

Hashing the weights reads all of them (0.8 s for SmolLM2 in fp32), so the digest is
remembered per model object until a weight is replaced, edited in place, or changes its
float64 sum (an edit through ``.data``, which bumps no version counter).
"""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from training.data.models import LoadedModel
from training.evaluation.ablation import weights_fingerprint

RECORD_FORMAT = 2
"""Bumped whenever what a record holds changes (its name hashes the code as well)."""

_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = (
    weakref.WeakKeyDictionary())


def record_key(lm: LoadedModel, layer: int, site: str, batches: list[Tensor]) -> str:
    """The name of the record of ``lm``'s clean pass over ``batches`` [B, T] at block
    ``layer``'s ``site``."""
    import transformers

    config = lm.model.config
    described = {"format": RECORD_FORMAT, "layer": layer, "site": site,
                 "model": type(lm.model).__name__, "config": config.to_json_string(),
                 "attention": getattr(config, "_attn_implementation", None),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "device": _device_name(lm.device), "code": code_digest()}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(model_digest(lm.model).encode())
    for ids in batches:
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(memoryview(ids.to(torch.int64).cpu().contiguous().numpy()))
    return digest.hexdigest()[:40]


def model_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``model`` (name, dtype, shape, bytes)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    fingerprint = weights_fingerprint(model)
    if fingerprint is not None:
        sums = tuple(torch.stack([t.detach().sum(dtype=torch.float64) for _, t in tensors])
                     .tolist()) if tensors else ()
        fingerprint = (fingerprint, sums)
    memo = _DIGESTS.get(model)
    if fingerprint is not None and memo is not None and memo[0] == fingerprint:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().contiguous().reshape(-1).cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    if fingerprint is not None:
        _DIGESTS[model] = (fingerprint, digest.hexdigest())
    return digest.hexdigest()


@functools.cache
def code_digest() -> str:
    """sha256 of the source that computes what a record holds."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [*sorted(here.glob("*.py")), here.parent / "data" / "hooks.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
