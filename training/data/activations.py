"""Cached activations on disk: sharded safetensors plus a manifest, and shuffled reading.

Layout of a capture directory::

    manifest.json               model, layer, d, dtype, context, token counts, shard list
    shard-00000.safetensors     "activations" [rows, d]: the non-BOS positions of
    shard-00001.safetensors     consecutive contexts, in order, and "tokens"
    ...                         [contexts, context] int32: those contexts' ids, BOS included,
                                for looking up the text around an activation

A transcoder's capture (``hook_point`` ``mlp``) reads block L's MLP: "activations" are the
MLP's inputs and each shard also holds "targets" [rows, d], its outputs at the same
positions. ``shard`` gives what an encoder reads (the inputs); training reads rows
input ‖ output [rows, 2d] (``training_shard``), so one shuffle keeps the pairs together.

Row r of the concatenated shards is context r // (context − 1), position r % (context − 1) + 1.
BOS positions are dropped: their norms are orders of magnitude larger and they carry no
information about the text, so they would dominate the SAE's loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

MANIFEST = "manifest.json"
SHARD_KEY = "activations"
TARGET_KEY = "targets"
MLP_HOOK = "mlp"
"""``hook_point`` of a transcoder's capture (block L's MLP input and output)."""
FORMAT_VERSION = 1


class ActivationError(ValueError):
    """An activation directory that is missing, incomplete or corrupt (message names it)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class Manifest:
    """What a capture directory holds (``manifest.json``)."""

    model: str
    layer: int
    d_model: int
    dtype: str
    context: int
    dataset: str
    contexts: int = 0
    rows: int = 0
    shards: list[int] = field(default_factory=list)
    """Rows in each shard, in order."""
    hook_point: str = "resid_post"
    exhausted: bool = False
    """The dataset ran out before the requested token count: this is all of it."""
    model_dtype: str = "fp32"
    """The model's weights during the capture (fp32, or bf16 for ``--precision bf16``)."""
    format_version: int = FORMAT_VERSION

    @property
    def rows_per_context(self) -> int:
        return self.context - 1

    @property
    def site(self) -> str:
        """What an SAE trained on this capture reads: ``resid`` or ``mlp`` (a transcoder)."""
        return "mlp" if self.hook_point == MLP_HOOK else "resid"

    def save(self, directory: Path) -> None:
        tmp = directory / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(directory / MANIFEST)

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ActivationError(f"{directory} is not an activation directory (no {MANIFEST})")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ActivationError(f"{path} is corrupt: {exc}") from exc


def read_shard(path: Path, d_model: int, key: str = SHARD_KEY) -> Tensor:
    """Load one shard's ``key`` tensor [rows, d]; a truncated or foreign file is an
    ActivationError."""
    try:
        acts = load_file(str(path))[key]
    except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
        raise ActivationError(f"corrupt activation shard {path}: {exc}") from exc
    if acts.ndim != 2 or acts.shape[1] != d_model:
        raise ActivationError(
            f"shard {path} has shape {tuple(acts.shape)}, expected [*, {d_model}]")
    return acts


class ActivationStore:
    """Read access to a finished capture directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        if self.manifest.rows == 0:
            raise ActivationError(f"{directory} holds no activations")

    def __len__(self) -> int:
        return self.manifest.rows

    def verify(self) -> None:
        """Check every shard's header against the manifest (rows, d) without reading the
        data, so a truncated or missing shard fails before a long run, not in the middle."""
        keys = (SHARD_KEY, TARGET_KEY) if self.paired else (SHARD_KEY,)
        for index, rows in enumerate(self.manifest.shards):
            path = self.directory / shard_name(index)
            try:
                with safe_open(str(path), "pt") as handle:
                    shapes = [handle.get_slice(key).get_shape() for key in keys]
            except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
                raise ActivationError(f"corrupt activation shard {path}: {exc}") from exc
            for shape in shapes:
                if list(shape) != [rows, self.d_model]:
                    raise ActivationError(f"shard {path} has shape {shape}, the manifest "
                                          f"says [{rows}, {self.d_model}]")

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def paired(self) -> bool:
        """A transcoder's capture: every row has an MLP input and its output."""
        return self.manifest.hook_point == MLP_HOOK

    @property
    def row_width(self) -> int:
        """Width of a training row: d, or 2d (input ‖ output) for a transcoder's capture."""
        return 2 * self.d_model if self.paired else self.d_model

    def shard(self, index: int) -> Tensor:
        """What an encoder reads from shard ``index``: [rows, d]."""
        return read_shard(self.directory / shard_name(index), self.d_model)

    def training_shard(self, index: int) -> Tensor:
        """Shard ``index``'s training rows [rows, row_width]."""
        inputs = self.shard(index)
        if not self.paired:
            return inputs
        path = self.directory / shard_name(index)
        return torch.cat([inputs, read_shard(path, self.d_model, TARGET_KEY)], dim=1)

    def tokens(self) -> Tensor:
        """Token ids of every captured context, [contexts, context] (int32)."""
        parts = []
        for index in range(len(self.manifest.shards)):
            with safe_open(str(self.directory / shard_name(index)), "pt") as handle:
                parts.append(handle.get_tensor("tokens"))
        return torch.cat(parts)

    def iter_sequential(self, batch: int) -> Iterator[Tensor]:
        """All rows in capture order, in batches of ``batch`` (the last may be smaller)."""
        for index in range(len(self.manifest.shards)):
            acts = self.shard(index)
            yield from acts.split(batch)

    def shard_offsets(self) -> list[int]:
        """Index of each shard's first row (plus the total at the end)."""
        offsets = [0]
        for rows in self.manifest.shards:
            offsets.append(offsets[-1] + rows)
        return offsets

    def _train_part(self, index: int, limit: int | None) -> Tensor | None:
        """Shard ``index`` cut to rows below ``limit`` (None if it lies wholly above)."""
        start = self.shard_offsets()[index]
        if limit is not None and start >= limit:
            return None
        acts = self.training_shard(index)
        return acts if limit is None else acts[:max(0, limit - start)]

    def iter_shuffled(self, batch: int, *, seed: int, buffer_shards: int = 4,
                      epochs: int | None = None, limit_rows: int | None = None
                      ) -> Iterator[Tensor]:
        """Batches [batch, row_width] (float32) in shuffled order, endlessly unless
        ``epochs`` is given.

        Shards are visited in a random order per epoch; ``buffer_shards`` of them at a time
        are concatenated and their rows permuted. Memory stays at a few shards, never the
        whole capture. Only rows below ``limit_rows`` are used (the rest is held out). The
        order depends only on ``seed``, so a resumed run that skips the batches it has
        already seen continues the same stream.
        """
        gen = torch.Generator().manual_seed(seed)
        carry = torch.empty(0, self.row_width)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(self.manifest.shards), generator=gen).tolist()
            for start in range(0, len(order), buffer_shards):
                group = order[start:start + buffer_shards]
                parts = [self._train_part(i, limit_rows) for i in group]
                pool = torch.cat([carry, *(p.float() for p in parts if p is not None)])
                pool = pool[torch.randperm(len(pool), generator=gen)]
                usable = len(pool) - len(pool) % batch
                if usable:  # (an empty tensor's split() is one empty batch, not none)
                    yield from pool[:usable].split(batch)
                carry = pool[usable:]
            epoch += 1

    def tail(self, rows: int) -> Tensor:
        """The last ``rows`` training rows of the capture [≤rows, row_width] (float32): the
        held-out set."""
        parts: list[Tensor] = []
        needed = rows
        for index in reversed(range(len(self.manifest.shards))):
            if needed <= 0:
                break
            acts = self.training_shard(index)
            parts.insert(0, acts[max(0, len(acts) - needed):])
            needed -= len(parts[0])
        return torch.cat(parts).float() if parts else torch.empty(0, self.row_width)

    def sample(self, rows: int, *, seed: int = 0, limit_rows: int | None = None) -> Tensor:
        """A shuffled sample of ``rows`` training rows [min(rows, available), row_width]
        (float32)."""
        available = len(self) if limit_rows is None else min(len(self), limit_rows)
        size = max(1, min(rows, available))
        return next(self.iter_shuffled(size, seed=seed, limit_rows=limit_rows))


def estimate_input_scale(sample: Tensor) -> float:
    """The dataset-level scale s with E‖s·x‖² = d (sample [N, d]).

    One scalar for the whole dataset (no per-token normalisation) keeps the SAE a linear
    function of the residual stream, which splicing and steering rely on.
    """
    mean_sq = sample.float().pow(2).sum(1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ActivationError("activations are all zero or not finite; cannot scale them")
    return math.sqrt(sample.shape[1] / mean_sq)
