"""Capturing residual-stream activations (or, for transcoders, block L's MLP input and
output from the same forward) to disk.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from training.data.activations import MLP_HOOK, SHARD_KEY, TARGET_KEY, Manifest, shard_name
from training.data.corpus import iter_texts
from training.data.hooks import site_outputs
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
    site: str = "resid"
    """``resid``: block L's output; ``mlp``: its MLP's input and output (for transcoders)."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.site not in ("resid", "mlp"):
            raise CaptureError(f"--site {self.site!r}: choose resid (block output) or mlp "
                               "(the MLP's input and output, for transcoders)")
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
    return capture_layers(lm, cfg, {cfg.layer: Path(out)}, progress=progress,
                          on_tokens=on_tokens)[cfg.layer]


def capture_layers(lm: LoadedModel, cfg: CaptureConfig, outs: Mapping[int, Path], *,
                   progress: bool = True, on_tokens: Callable[[int, int], None] | None = None
                   ) -> dict[int, Manifest]:
    """Capture several blocks' outputs from one forward pass per batch (it stops after the
    deepest of them): ``outs`` maps each layer to its own capture folder, each one exactly
    what ``capture`` alone would write (``cfg.layer`` is replaced by each layer)."""
    if not outs:
        raise CaptureError("--layer: give at least one layer")
    cfgs = {layer: replace(cfg, layer=layer) for layer in outs}
    for layer in outs:
        lm.check_layer(layer)
    _check_context(lm, cfg.context)
    done = {layer: _existing(Path(out), lm, cfgs[layer]) for layer, out in outs.items()}
    todo = {layer: _Target(Path(out), cfgs[layer]) for layer, out in outs.items()
            if done[layer] is None}
    if not todo:
        return done
    for target in todo.values():
        target.manifest = _resume_or_start(target.partial, lm, target.cfg)
    _align(todo.values(), cfg.contexts_per_shard)
    try:
        _fill(lm, cfg, todo, progress, on_tokens)
    except (KeyboardInterrupt, Interrupted):
        log.warning("capture interrupted; run the same command again to resume")
        raise
    except BaseException as exc:
        for target in todo.values():
            shutil.rmtree(target.partial, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CaptureError(f"disk full while writing activations to "
                               f"{', '.join(str(t.out) for t in todo.values())}") from exc
        raise
    for layer, target in todo.items():
        os.replace(target.partial, target.out)
        done[layer] = target.manifest
    return done


@dataclass
class _Target:
    """One layer's capture in progress: its folder, settings and manifest."""

    out: Path
    cfg: CaptureConfig
    manifest: Manifest | None = None

    @property
    def partial(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"


def _align(targets: Iterable[_Target], per_shard: int) -> None:
    """Layers interrupted between their shard writes resume from the shard count they all
    reached: the shards written after it are dropped (they are written again)."""
    targets = list(targets)
    common = min(len(t.manifest.shards) for t in targets)
    for target in targets:
        manifest = target.manifest
        if len(manifest.shards) > common:
            manifest.shards = manifest.shards[:common]
            manifest.contexts, manifest.rows = common * per_shard, sum(manifest.shards)
            manifest.save(target.partial)
            _drop_stray_files(target.partial, common)


def _check_context(lm: LoadedModel, context: int) -> None:
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise CaptureError(f"--context {context} exceeds {lm.name}'s {limit} positions")


def _params(lm: LoadedModel, cfg: CaptureConfig) -> dict:
    weights = next(lm.model.parameters()).dtype
    return {"model": lm.name, "layer": cfg.layer, "d_model": lm.d_model, "dtype": cfg.dtype,
            "context": cfg.context, "dataset": cfg.dataset, "hook_point": _hook_point(cfg),
            "model_dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights, "fp32")}


def _hook_point(cfg: CaptureConfig) -> str:
    return MLP_HOOK if cfg.site == "mlp" else "resid_post"


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
    manifest = Manifest(**_params(lm, cfg))
    manifest.save(partial)
    return manifest


def _drop_stray_files(partial: Path, complete: int) -> None:
    """Remove temp files and shards written after the last manifest update."""
    for path in partial.iterdir():
        if path.name.startswith(".") or (path.name.startswith("shard-")
                                         and int(path.name[6:11]) >= complete):
            path.unlink()


def _fill(lm: LoadedModel, cfg: CaptureConfig, targets: Mapping[int, _Target],
          progress: bool, on_tokens: Callable[[int, int], None] | None) -> None:
    """Run the model over the remaining contexts, writing one shard per
    ``contexts_per_shard`` into every target (all at the same shard count)."""
    manifests = [t.manifest for t in targets.values()]
    first = manifests[0]
    done = first.contexts
    remaining = cfg.contexts_needed - done
    if remaining <= 0:
        return
    contexts = itertools.islice(_contexts(lm, cfg), done, cfg.contexts_needed)
    names = ",".join(f"L{layer}" for layer in targets)
    bar = tqdm(total=remaining * (cfg.context - 1), unit="tok", desc=f"capture {names}",
               disable=not progress)
    dtype = parse_dtype(cfg.dtype)
    counted = [first.rows]  # not bar.n: a disabled bar counts nothing

    def advance(rows: int) -> None:
        bar.update(rows)
        counted[0] += rows
        if on_tokens is not None:
            on_tokens(min(counted[0], cfg.tokens), cfg.tokens)

    with bar:
        for group in _batched(contexts, cfg.contexts_per_shard):
            ids = torch.tensor(group, dtype=torch.long)
            acts = _activations(lm, list(targets), cfg.batch_contexts, ids, advance, cfg.site)
            for layer, target in targets.items():
                _append_shard(target, acts[layer].to(dtype), ids, len(group))
    if first.contexts == 0:
        raise CaptureError(f"dataset {cfg.dataset!r} yielded no complete context of "
                           f"{cfg.context} tokens")
    if first.rows < cfg.tokens:
        for target in targets.values():
            target.manifest.exhausted = True
            target.manifest.save(target.partial)
        log.warning("dataset %r ran out after %d of the %d tokens asked for", cfg.dataset,
                    first.rows, cfg.tokens)


def _append_shard(target: _Target, acts: Tensor, ids: Tensor, contexts: int) -> None:
    manifest = target.manifest
    tensors = {SHARD_KEY: acts}
    if manifest.hook_point == MLP_HOOK:  # input ‖ output -> two tensors
        tensors = {SHARD_KEY: acts[:, :manifest.d_model], TARGET_KEY: acts[:, manifest.d_model:]}
    _write_shard(target.partial, len(manifest.shards), tensors, ids)
    manifest.shards.append(acts.shape[0])
    manifest.contexts += contexts
    manifest.rows += acts.shape[0]
    manifest.save(target.partial)


def activation_stream(lm: LoadedModel, cfg: CaptureConfig, *, skip_contexts: int = 0
                      ) -> Iterator[tuple[Tensor, int]]:
    """Block ``cfg.layer``'s non-BOS activations of ``cfg.dataset`` straight from the
    model, one forward batch at a time, without writing anything: (rows [C·(T−1), d] as
    float32, contexts consumed so far), after skipping the first ``skip_contexts``."""
    for rows, consumed in layer_streams(lm, cfg, [cfg.layer], skip_contexts=skip_contexts):
        yield rows[cfg.layer], consumed


def layer_streams(lm: LoadedModel, cfg: CaptureConfig, layers: list[int], *,
                  skip_contexts: int = 0) -> Iterator[tuple[dict[int, Tensor], int]]:
    """``activation_stream`` for several blocks from one forward per batch (it stops
    after the deepest): ({layer: rows [C·(T−1), d]}, contexts consumed so far); each
    block's rows are those a stream of that block alone yields."""
    for layer in layers:
        lm.check_layer(layer)
    _check_context(lm, cfg.context)
    if cfg.site != "resid":
        raise CaptureError("training from the model as it reads is for residual-stream SAEs; "
                           "capture a transcoder's activations first (capture --site mlp)")
    contexts = itertools.islice(_contexts(lm, cfg), skip_contexts, None)
    consumed = skip_contexts
    for group in _batched(contexts, cfg.batch_contexts):
        ids = torch.tensor(group, dtype=torch.long)
        rows = _activations(lm, list(layers), cfg.batch_contexts, ids, lambda _rows: None)
        consumed += len(group)
        yield rows, consumed


def _contexts(lm: LoadedModel, cfg: CaptureConfig) -> Iterator[list[int]]:
    texts = iter_texts(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
    return pack_contexts(texts, lm.tokenizer, cfg.context, lm.bos_id)


def _batched(items: Iterator[list[int]], size: int) -> Iterator[list[list[int]]]:
    while group := list(itertools.islice(items, size)):
        yield group


def _activations(lm: LoadedModel, layers: list[int], batch_contexts: int, ids: Tensor,
                 advance: Callable[[int], None], site: str = "resid") -> dict[int, Tensor]:
    """Non-BOS activations of contexts ids [C, T] -> {layer: [C·(T−1), d]} ([.., 2d],
    input ‖ output, at the ``mlp`` site), on the CPU; ``advance(rows)`` after each forward
    batch."""
    chunks: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for batch in ids.split(batch_contexts):
        hidden = site_outputs(lm.model, lm.blocks, layers, batch.to(lm.device), site)
        for layer, h in hidden.items():
            chunks[layer].append(h[:, 1:].reshape(-1, h.shape[-1]).float().cpu())
        advance(batch.numel() - batch.shape[0])
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def _write_shard(partial: Path, index: int, tensors: dict[str, Tensor], ids: Tensor) -> None:
    final = partial / shard_name(index)
    tmp = partial / f".{final.name}.tmp"
    save_file({**{key: t.contiguous() for key, t in tensors.items()},
               "tokens": ids.to(torch.int32).contiguous()}, str(tmp))
    tmp.replace(final)
