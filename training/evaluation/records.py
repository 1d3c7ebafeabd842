"""The clean half of an evaluation, kept so that later evaluations of the same text skip it.

Everything an evaluation computes without the SAE — the forward up to block L, the clean
logits, CE_clean and CE_ablate — is the same for every SAE evaluated at that block on the
same text: a sweep's members, a retrained SAE, one read back from SAELens. A record keeps,
per batch, what an SAE's spliced pass and its losses need of it:

* the SAE's input: block L's output [B, T, d], or at the ``mlp`` site the MLP's input,
  its output and the residual stream the block adds it to, in the model's dtype — so the
  spliced pass starts from the very tensors the clean pass made and gives the same logits,
  bit for bit;
* the batch's summed CE_clean and CE_ablate (float64);
* for the KL, at each predicted position: the clean final norm's output u_p [B, T − 1, d]
  (the LM head's input, in the model's dtype), its logits' log-normaliser logsumexp(z_p)
  [B, T − 1] and the clean distribution's mean unembedding ū = Σ_v p(v) W_U[v]
  [B, T − 1, d] (float32). The logits are the LM head of u, z = W_U u (no bias), so
  Σ_v p(v) (z_q(v) − z_p(v)) = ū · (u_q − u_p) and
  KL(p ‖ q) = logsumexp(z_q) − logsumexp(z_p) − ū · (u_q − u_p) needs no [T, V] clean
  distribution. It is the KL of the clean log-probabilities up to float rounding (a
  relative 1e-6 on SmolLM2; ``tests/test_eval_records.py``).

A record is found by a hash of everything its figures depend on: every parameter and
buffer of the model (names, dtypes, shapes and bytes), its config and attention
implementation, the torch and transformers versions, the device type, the block, the site
and each batch's token ids (and their batching). Any difference gives another record, and
a record's ids are compared with the batches before it is read, so a record is never read
for other text or other weights. Records are written whole (a hidden temporary folder,
then a rename), and the folder is held under ``max_bytes`` by removing the records read
longest ago.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from training.data.models import LoadedModel
from training.evaluation.ablation import weights_fingerprint

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
"""Bumped whenever what a record holds or how it is computed changes."""
RECORD_FILE = "record.json"
DEFAULT_MAX_BYTES = 4 * 2**30
"""The records folder's bound; a single record over half of it is not written."""
STALE_PARTIAL_S = 24 * 3600
"""A temporary folder this old was left by a process that died while writing."""
SITE_INPUTS = {"resid": ("hidden",), "mlp": ("mlp_in", "mlp_out", "residual")}
"""The clean-pass tensors [B, T, d] a record keeps at each site."""
KL_TERMS = ("clean_states", "log_normaliser", "mean_unembed")
"""The tensors a record keeps for the KL (shapes in the module docstring)."""


@dataclass
class RecordedBatch:
    """One batch of a recorded clean pass (shapes in the module docstring)."""

    ids: Tensor
    inputs: dict[str, Tensor]
    clean_states: Tensor
    log_normaliser: Tensor
    mean_unembed: Tensor
    ce_clean: float
    ce_ablate: float


_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = (
    weakref.WeakKeyDictionary())


def model_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``model`` (name, dtype, shape, bytes),
    remembered until a weight is replaced or edited in place."""
    fingerprint = weights_fingerprint(model)
    memo = _DIGESTS.get(model)
    if fingerprint is not None and memo is not None and memo[0] == fingerprint:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        flat = tensor.detach().contiguous().reshape(-1).cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    if fingerprint is not None:
        _DIGESTS[model] = (fingerprint, digest.hexdigest())
    return digest.hexdigest()


def record_key(lm: LoadedModel, layer: int, site: str, batches: list[Tensor]) -> str:
    """The name of the record of ``lm``'s clean pass over ``batches`` [B, T] at block
    ``layer``'s ``site``: a hash of everything its contents depend on."""
    import transformers

    config = lm.model.config
    described = {"format": RECORD_FORMAT, "layer": layer, "site": site,
                 "model": type(lm.model).__name__, "config": config.to_json_string(),
                 "attention": getattr(config, "_attn_implementation", None),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "device": lm.device.type}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(model_digest(lm.model).encode())
    for ids in batches:
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(memoryview(ids.to(torch.int64).cpu().contiguous().numpy()))
    return digest.hexdigest()[:40]


def record_bytes(batches: list[Tensor], site: str, d: int, dtype: torch.dtype) -> int:
    """What the record of ``batches`` takes on disk (within a few kB)."""
    size = torch.empty((), dtype=dtype).element_size()
    inputs = len(SITE_INPUTS[site])
    return sum(ids.numel() * (8 + inputs * d * size)
               + (ids.numel() - ids.shape[0]) * (d * (4 + size) + 4) for ids in batches)


class RecordWriter:
    """Writes one record batch by batch into a hidden temporary folder, renamed into
    place by ``commit``; ``discard`` (or an exception inside ``with``) removes it."""

    def __init__(self, records: CleanRecords, key: str, unembed: Tensor) -> None:
        self.records, self.key, self.batches = records, key, 0
        self.work = records.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        self.work.mkdir(parents=True)
        self._unembed, self._unembed32 = unembed, None
        self.outcome = "written"
        """What became of the record: a failure to write it (a full disk, say) is
        logged and ends the record, never the evaluation."""

    @property
    def unembed(self) -> Tensor:
        """The LM head's weight [V, d] in float32 (one copy for a bf16 model)."""
        if self._unembed32 is None:
            self._unembed32 = self._unembed.float()
        return self._unembed32

    def add(self, batch: RecordedBatch) -> None:
        if self.outcome != "written":
            return
        tensors = {name: getattr(batch, name) for name in (*KL_TERMS, "ids")}
        tensors.update(batch.inputs)
        figures = {"ce_clean": batch.ce_clean, "ce_ablate": batch.ce_ablate}
        try:
            save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                      str(self.work / f"batch-{self.batches:05d}.safetensors"),
                      metadata={name: repr(float(value)) for name, value in figures.items()})
        except OSError as exc:
            self._fail(exc)
        self.batches += 1

    def commit(self, described: dict) -> None:
        if self.outcome != "written":
            return
        try:
            (self.work / RECORD_FILE).write_text(json.dumps(
                {**described, "format": RECORD_FORMAT, "key": self.key,
                 "batches": self.batches}))
        except OSError as exc:
            self._fail(exc)
            return
        try:
            os.rename(self.work, self.records.root / self.key)
        except OSError:  # another process recorded the same pass first
            self.discard()
            return
        self.records.evict(keep=self.key)

    def _fail(self, exc: OSError) -> None:
        log.warning("the evaluation goes on without recording its clean pass: %s", exc)
        self.outcome = f"not recorded: {exc}"
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if kind is not None:
            self.discard()


class CleanRecords:
    """A folder of recorded clean passes, at most ``max_bytes`` in all."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self.outcome: str | None = None
        """What the last evaluation did with its clean pass: "read" (from a record),
        "written" (recorded), or "not recorded: why"."""

    def read(self, key: str, batches: list[Tensor], site: str, device: torch.device
             ) -> list[RecordedFile] | None:
        """The record ``key`` of exactly these batches, one file a batch, each checked
        (names, shapes, token ids) and mapped but loaded only when asked; None when there
        is none. A record that fails a check (damaged, or of other ids) is removed, with a
        warning, and the pass is computed again."""
        folder = self.root / key
        if not (folder / RECORD_FILE).is_file():
            return None
        try:
            os.utime(folder / RECORD_FILE)  # read now: the last to be evicted
            described = json.loads((folder / RECORD_FILE).read_text())
            if described.get("batches") != len(batches):
                raise ValueError(f"it holds {described.get('batches')} batches")
            return [RecordedFile(folder / f"batch-{index:05d}.safetensors", ids, site, device)
                    for index, ids in enumerate(batches)]
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("the evaluation record %s cannot be read (%s): removing it and "
                        "running the clean pass again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def writer(self, key: str, nbytes: int, unembed: Tensor) -> RecordWriter | None:
        """A writer for record ``key`` of ``nbytes``; None when it would take over half
        the folder's bound (the evaluation then keeps no record)."""
        if nbytes > self.max_bytes // 2:
            self.outcome = (f"not recorded: {nbytes / 1e6:.0f} MB is over half the records' "
                            f"bound of {self.max_bytes / 1e6:.0f} MB")
            log.info("%s", self.outcome)
            return None
        try:
            return RecordWriter(self, key, unembed)
        except OSError as exc:
            self.outcome = f"not recorded: {exc}"
            log.warning("the evaluation goes on without recording its clean pass: %s", exc)
            return None

    def evict(self, keep: str) -> None:
        """Remove the records read longest ago (never ``keep``) until the folder is within
        its bound, and temporary folders left by processes that died while writing."""
        records = []
        for folder in self.root.iterdir():
            try:  # another process may be removing or renaming the same folders
                if folder.name.endswith(".partial"):
                    if time.time() - folder.stat().st_mtime > STALE_PARTIAL_S:
                        shutil.rmtree(folder, ignore_errors=True)
                elif (folder / RECORD_FILE).is_file():
                    size = sum(f.stat().st_size for f in folder.iterdir())
                    records.append(((folder / RECORD_FILE).stat().st_mtime, size, folder))
            except OSError:
                continue
        total = sum(size for _, size, _ in records)
        for _, size, folder in sorted(records):
            if total <= self.max_bytes:
                break
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size


class RecordedFile:
    """One batch of a record, checked against the batch ids [B, T] it must hold and kept
    mapped (so removing the record meanwhile cannot pull it away), loaded by ``load``."""

    def __init__(self, path: Path, ids: Tensor, site: str, device: torch.device) -> None:
        self.handle = safe_open(str(path), framework="pt", device=str(device))
        batch, length = ids.shape
        d = self.handle.get_slice(SITE_INPUTS[site][0]).get_shape()[-1]
        expected = {"ids": [batch, length], "clean_states": [batch, length - 1, d],
                    "log_normaliser": [batch, length - 1],
                    "mean_unembed": [batch, length - 1, d],
                    **{name: [batch, length, d] for name in SITE_INPUTS[site]}}
        shapes = {name: self.handle.get_slice(name).get_shape()
                  for name in self.handle.keys()}  # noqa: SIM118
        if shapes != expected:
            raise ValueError(f"{path.name} holds {shapes}, not the {site} record of a "
                             f"[{batch}, {length}] batch")
        self.figures = {name: float((self.handle.metadata() or {})[name])
                        for name in ("ce_clean", "ce_ablate")}
        if not torch.equal(self.handle.get_tensor("ids"), ids.to(device)):
            raise ValueError(f"the token ids of {path.name} are not those of this batch")
        self.site = site

    def load(self) -> RecordedBatch:
        tensors = {name: self.handle.get_tensor(name)
                   for name in ("ids", *KL_TERMS, *SITE_INPUTS[self.site])}
        return RecordedBatch(tensors["ids"],
                             {name: tensors[name] for name in SITE_INPUTS[self.site]},
                             *(tensors[name] for name in KL_TERMS), self.figures["ce_clean"],
                             self.figures["ce_ablate"])
