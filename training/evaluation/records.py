"""The clean half of an evaluation, kept so that later evaluations of the same text skip it.

Everything an evaluation computes without the SAE — the forward up to block L, the clean
logits, CE_clean and CE_ablate — is the same for every SAE evaluated at that block on the
same text: a sweep's members, a retrained SAE, one read back from SAELens. A record keeps,
per batch, what an SAE's spliced pass and its losses need of it:

* the SAE's input: block L's output [B, T, d], or at the ``mlp`` site the MLP's input,
  its output and the residual stream the block adds it to — so the spliced pass starts
  from the very tensors the clean pass made and gives the same logits, bit for bit;
* the batch's summed CE_clean and CE_ablate (float64);
* for the KL, at each predicted position: the clean final norm's output u_p [B, T − 1, d]
  (the LM head's input), its logits' log-normaliser logsumexp(z_p) [B, T − 1] and the
  clean distribution's mean unembedding ū = Σ_v p(v) W_U[v] [B, T − 1, d]. The logits are
  the LM head of u, z = W_U u (no bias), so Σ_v p(v) (z_q(v) − z_p(v)) = ū · (u_q − u_p)
  and KL(p ‖ q) = logsumexp(z_q) − logsumexp(z_p) − ū · (u_q − u_p) needs no [T, V] clean
  distribution. It is the KL of the clean log-probabilities up to float32 rounding (a
  relative 6e-6 at most on SmolLM2; ``tests/test_eval_records.py``).

Only float32 models are recorded: a bf16 model rounds its logits after the head, which the
identity above does not see, so a KL read from a record would differ from a fresh one by
that rounding (0.3% and 0.8% for the demo SAE of SmolLM2 on two texts).

A record is named by a hash of everything its contents depend on
(``training.evaluation.record_key``), and its token ids and each file's sha256 are checked
again when it is opened, so a record is read only for exactly its batches, and a damaged
one is removed and computed again. Records are written whole (a hidden temporary folder,
then a rename); the folder is held under ``max_bytes`` by removing the records read
longest ago. A record that cannot be written (a full disk) is given up with a warning,
never the evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialise
from torch import Tensor

from training.evaluation.record_key import RECORD_FORMAT

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"
DEFAULT_MAX_BYTES = 4 * 2**30
"""The records folder's bound; a single record over half of it is not written."""
STALE_S = 24 * 3600
"""A temporary or incomplete folder this old was left by a process that died."""
SITE_INPUTS = {"resid": ("hidden",), "mlp": ("mlp_in", "mlp_out", "residual")}
"""The clean-pass tensors [B, T, d] a record keeps at each site."""
KL_TERMS = ("clean_states", "log_normaliser", "mean_unembed")
"""The tensors a record keeps for the KL (shapes in the module docstring)."""
WRITE_ERRORS = (OSError, SafetensorError)


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


def record_bytes(batches: list[Tensor], site: str, d: int) -> int:
    """What the record of ``batches`` takes on disk (float32 tensors; within a few kB)."""
    inputs = len(SITE_INPUTS[site])
    return sum(ids.numel() * (8 + inputs * d * 4) + (ids.numel() - ids.shape[0]) * (d * 8 + 4)
               for ids in batches)


class RecordWriter:
    """Writes one record batch by batch into a hidden temporary folder, renamed into
    place by ``commit``; an exception inside ``with`` removes it. A write that fails ends
    the record (``failure`` says why), never the evaluation."""

    def __init__(self, records: CleanRecords, key: str) -> None:
        self.records, self.key = records, key
        self.work = records.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        self.work.mkdir(parents=True)
        self.hashes: list[str] = []
        self.failure: str | None = None

    def add(self, batch: RecordedBatch) -> None:
        """Write one batch (its tensors and CEs) as ``batch-NNNNN.safetensors``."""
        if self.failure:
            return
        tensors = {name: getattr(batch, name) for name in (*KL_TERMS, "ids")}
        tensors.update(batch.inputs)
        figures = {"ce_clean": batch.ce_clean, "ce_ablate": batch.ce_ablate}
        try:
            data = serialise({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                             {name: repr(float(value)) for name, value in figures.items()})
            (self.work / _batch_file(len(self.hashes))).write_bytes(data)
        except WRITE_ERRORS as exc:
            self._fail(exc)
            return
        self.hashes.append(hashlib.sha256(data).hexdigest())

    def commit(self, described: dict) -> str:
        """Put the record in place (then keep the folder within its bound); returns what
        became of it: "written", or "not recorded: why"."""
        if self.failure:
            return self.failure
        try:
            (self.work / RECORD_FILE).write_text(json.dumps(
                {**described, "format": RECORD_FORMAT, "key": self.key,
                 "batches": len(self.hashes), "sha256": self.hashes}))
            self._rename()
        except WRITE_ERRORS as exc:
            self._fail(exc)
            return self.failure
        self.records.evict(keep=self.key)
        return "written"

    def _rename(self) -> None:
        """Rename the work folder to the record's name. A whole record already there was
        written by another process meanwhile (ours is dropped); a folder without its
        ``record.json`` is what a killed removal left, and is replaced."""
        target = self.records.root / self.key
        try:
            os.rename(self.work, target)
        except OSError:
            if (target / RECORD_FILE).is_file():
                self.discard()
                return
            shutil.rmtree(target, ignore_errors=True)
            os.rename(self.work, target)

    def _fail(self, exc: Exception) -> None:
        log.warning("the evaluation goes on without recording its clean pass: %s", exc)
        self.failure = f"not recorded: {exc}"
        self.discard()

    def discard(self) -> None:
        """Remove the temporary folder."""
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
        (sha256, names, shapes, token ids) and mapped but loaded only when asked; None when
        there is none or it cannot be opened now. A record whose contents fail a check
        is removed, with a warning, and the pass is computed again."""
        folder = self.root / key
        if not (folder / RECORD_FILE).is_file():
            return None
        try:
            os.utime(folder / RECORD_FILE)  # read now: the last to be evicted
            described = json.loads((folder / RECORD_FILE).read_text())
            if not isinstance(described, dict) or described.get("batches") != len(batches):
                raise ValueError("it does not describe this evaluation's batches")
            hashes = described.get("sha256")
            if not isinstance(hashes, list) or len(hashes) != len(batches):
                raise ValueError("it lists no checksum for each batch")
            return [RecordedFile(folder / _batch_file(index), ids, hashes[index], site, device)
                    for index, ids in enumerate(batches)]
        except (ValueError, KeyError, SafetensorError) as exc:
            log.warning("the evaluation record %s is damaged (%s): removing it and running "
                        "the clean pass again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError as exc:  # not the record's fault (permissions, open files): kept
            log.warning("the evaluation record %s cannot be opened (%s): running the clean "
                        "pass again", folder, exc)
        return None

    def writer(self, key: str, nbytes: int) -> RecordWriter | None:
        """A writer for record ``key`` of ``nbytes``; None when it would take over half
        the folder's bound, or cannot start (``outcome`` says why)."""
        if nbytes > self.max_bytes // 2:
            self.outcome = (f"not recorded: {nbytes / 1e6:.0f} MB is over half the records' "
                            f"bound of {self.max_bytes / 1e6:.0f} MB")
            log.info("%s", self.outcome)
            return None
        try:
            return RecordWriter(self, key)
        except OSError as exc:
            self.outcome = f"not recorded: {exc}"
            log.warning("the evaluation goes on without recording its clean pass: %s", exc)
            return None

    def evict(self, keep: str) -> None:
        """Remove the records read longest ago (never ``keep``) until the folder is within
        its bound, and folders left by processes that died while writing or removing."""
        records = []
        for folder in self.root.iterdir():
            try:  # another process may be removing or renaming the same folders
                if (folder / RECORD_FILE).is_file():
                    size = sum(f.stat().st_size for f in folder.iterdir())
                    records.append(((folder / RECORD_FILE).stat().st_mtime, size, folder))
                elif time.time() - folder.stat().st_mtime > STALE_S:
                    shutil.rmtree(folder, ignore_errors=True)
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
    """One batch of a record, checked against its sha256 and the batch ids [B, T] it must
    hold, and kept mapped (on Linux, removing the record meanwhile cannot pull it away);
    loaded by ``load``."""

    def __init__(self, path: Path, ids: Tensor, sha256: str, site: str,
                 device: torch.device) -> None:
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ValueError(f"{path.name} does not match its checksum")
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
        """The batch's tensors, on the device it was opened for."""
        tensors = {name: self.handle.get_tensor(name)
                   for name in ("ids", *KL_TERMS, *SITE_INPUTS[self.site])}
        return RecordedBatch(tensors["ids"],
                             {name: tensors[name] for name in SITE_INPUTS[self.site]},
                             *(tensors[name] for name in KL_TERMS), self.figures["ce_clean"],
                             self.figures["ce_ablate"])


def _batch_file(index: int) -> str:
    return f"batch-{index:05d}.safetensors"
