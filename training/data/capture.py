"""Capturing residual-stream activations to disk.

Decisions:
* The forward pass stops after block L (``hooks.block_output``): no later blocks, no LM head.
* Contexts are packed, fixed-length and start with BOS; the BOS position is not stored.
* Output is written into a hidden sibling ``.<out>.partial`` directory, one shard at a time
  (each shard file itself written to a temp name and renamed), then the directory is renamed
  to ``out``. An interrupted capture resumes from its last complete shard when run again
  with the same settings; a failed one (bad input, disk full) leaves nothing behind.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from training.data.activations import SHARD_KEY, Manifest, shard_name
from training.data.corpus import iter_texts
from training.data.hooks import block_output
from training.data.models import LoadedModel, parse_dtype
from training.data.packing import pack_contexts
from training.data.stop import Interrupted

log = logging.getLogger(__name__)


class CaptureError(ValueError):
    """A capture that cannot start or finish; the message names the cause."""


@dataclass
class CaptureConfig:
    """What to capture (saved in the manifest; a resume must match it)."""

    layer: int
    """Decoder block whose output is captured (0-based)."""
    tokens: int
    """Activation rows to capture (BOS positions excluded); rounded up to whole shards'
    worth of contexts only at the last batch."""
    dataset: str = "embedded"
    context: int = 128
    """Tokens per packed context, BOS included."""
    dtype: str = "fp16"
    """Storage dtype of the activations: fp16, bf16 or fp32."""
    batch_contexts: int = 16
    """Contexts per forward pass."""
    shard_rows: int = 1 << 16
    """Target rows per shard file."""
    split: str = "train"
    text_column: str = "text"

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.tokens < 1:
            raise CaptureError("--tokens must be positive")
        if self.context < 2:
            raise CaptureError("--context must be at least 2 (BOS plus one token)")
        if self.batch_contexts < 1:
            raise CaptureError("--batch must be positive")

    @property
    def contexts_needed(self) -> int:
        return -(-self.tokens // (self.context - 1))

    @property
    def contexts_per_shard(self) -> int:
        return max(1, self.shard_rows // (self.context - 1))


def capture(lm: LoadedModel, cfg: CaptureConfig, out: Path, *, progress: bool = True,
            on_tokens: Callable[[int, int], None] | None = None) -> Manifest:
    """Capture ``cfg.tokens`` activations of block ``cfg.layer`` into ``out``.

    ``on_tokens(rows captured, rows asked for)`` is called after every forward batch; an
    exception raised there stops the capture (and removes its partial directory, unless it
    is ``Interrupted``)."""
    out = Path(out)
    lm.check_layer(cfg.layer)
    _check_context(lm, cfg.context)
    finished = _existing(out, lm, cfg)
    if finished is not None:
        return finished
    partial = out.parent / f".{out.name}.partial"
    manifest = _resume_or_start(partial, lm, cfg)
    try:
        _fill(lm, cfg, partial, manifest, progress, on_tokens)
    except (KeyboardInterrupt, Interrupted):
        log.warning("capture interrupted; run the same command again to resume from %s", partial)
        raise
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CaptureError(f"disk full while writing activations to {out}") from exc
        raise
    os.replace(partial, out)
    return manifest


def _check_context(lm: LoadedModel, context: int) -> None:
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise CaptureError(f"--context {context} exceeds {lm.name}'s {limit} positions")


def _params(lm: LoadedModel, cfg: CaptureConfig) -> dict:
    return {"model": lm.name, "layer": cfg.layer, "d_model": lm.d_model, "dtype": cfg.dtype,
            "context": cfg.context, "dataset": cfg.dataset}


def _matches(manifest: Manifest, lm: LoadedModel, cfg: CaptureConfig) -> bool:
    return all(getattr(manifest, key) == value for key, value in _params(lm, cfg).items())


def _existing(out: Path, lm: LoadedModel, cfg: CaptureConfig) -> Manifest | None:
    """A finished capture with the same settings and enough rows is reused as it is."""
    if not out.exists():
        return None
    try:
        manifest = Manifest.load(out)
    except ValueError as exc:
        raise CaptureError(f"--out {out} exists and is not a capture: {exc}") from exc
    if not _matches(manifest, lm, cfg):
        raise CaptureError(f"--out {out} already holds a different capture; choose a new --out")
    if manifest.rows < cfg.tokens and not manifest.exhausted:
        raise CaptureError(f"--out {out} holds only {manifest.rows} rows of this capture "
                           f"(--tokens {cfg.tokens}); choose a new --out")
    log.info("%s already holds this capture (%d rows); nothing to do", out, manifest.rows)
    return manifest


def _resume_or_start(partial: Path, lm: LoadedModel, cfg: CaptureConfig) -> Manifest:
    if partial.exists():
        try:
            manifest = Manifest.load(partial)
        except ValueError:
            manifest = None
        if manifest is not None and _matches(manifest, lm, cfg):
            _drop_stray_files(partial, len(manifest.shards))
            log.info("resuming capture from %d complete shards", len(manifest.shards))
            return manifest
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    manifest = Manifest(**_params(lm, cfg), hook_point="resid_post")
    manifest.save(partial)
    return manifest


def _drop_stray_files(partial: Path, complete: int) -> None:
    """Remove temp files and shards written after the last manifest update."""
    for path in partial.iterdir():
        if path.name.startswith(".") or (path.name.startswith("shard-")
                                         and int(path.name[6:11]) >= complete):
            path.unlink()


def _fill(lm: LoadedModel, cfg: CaptureConfig, partial: Path, manifest: Manifest,
          progress: bool, on_tokens: Callable[[int, int], None] | None) -> None:
    """Run the model over the remaining contexts, writing one shard per ``contexts_per_shard``."""
    done = manifest.contexts
    remaining = cfg.contexts_needed - done
    if remaining <= 0:
        return
    contexts = itertools.islice(_contexts(lm, cfg), done, cfg.contexts_needed)
    bar = tqdm(total=remaining * (cfg.context - 1), unit="tok", desc=f"capture L{cfg.layer}",
               disable=not progress)
    dtype = parse_dtype(cfg.dtype)
    counted = [manifest.rows]  # not bar.n: a disabled bar counts nothing

    def advance(rows: int) -> None:
        bar.update(rows)
        counted[0] += rows
        if on_tokens is not None:
            on_tokens(min(counted[0], cfg.tokens), cfg.tokens)

    with bar:
        for group in _batched(contexts, cfg.contexts_per_shard):
            ids = torch.tensor(group, dtype=torch.long)
            acts = _activations(lm, cfg, ids, advance).to(dtype)
            _write_shard(partial, len(manifest.shards), acts, ids)
            manifest.shards.append(acts.shape[0])
            manifest.contexts += len(group)
            manifest.rows += acts.shape[0]
            manifest.save(partial)
    if manifest.contexts == 0:
        raise CaptureError(f"dataset {cfg.dataset!r} yielded no complete context of "
                           f"{cfg.context} tokens")
    if manifest.rows < cfg.tokens:
        manifest.exhausted = True
        manifest.save(partial)
        log.warning("dataset %r ran out after %d of the %d tokens asked for", cfg.dataset,
                    manifest.rows, cfg.tokens)


def _contexts(lm: LoadedModel, cfg: CaptureConfig) -> Iterator[list[int]]:
    texts = iter_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    return pack_contexts(texts, lm.tokenizer, cfg.context, lm.bos_id)


def _batched(items: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    while group := list(itertools.islice(items, size)):
        yield group


def _activations(lm: LoadedModel, cfg: CaptureConfig, ids: Tensor,
                 advance: Callable[[int], None]) -> Tensor:
    """Non-BOS activations of contexts ids [C, T] -> [C·(T−1), d], on the CPU;
    ``advance(rows)`` after each forward batch."""
    chunks = []
    for batch in ids.split(cfg.batch_contexts):
        hidden = block_output(lm.model, lm.blocks, cfg.layer, batch.to(lm.device))
        chunks.append(hidden[:, 1:].reshape(-1, hidden.shape[-1]).float().cpu())
        advance(batch.numel() - batch.shape[0])
    return torch.cat(chunks)


def _write_shard(partial: Path, index: int, acts: Tensor, ids: Tensor) -> None:
    final = partial / shard_name(index)
    tmp = partial / f".{final.name}.tmp"
    save_file({SHARD_KEY: acts.contiguous(), "tokens": ids.to(torch.int32).contiguous()},
              str(tmp))
    tmp.replace(final)
