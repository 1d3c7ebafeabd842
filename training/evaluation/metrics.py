"""Evaluating an SAE spliced into its model.

For each batch of packed contexts the model runs clean, with block L's output replaced by
the SAE reconstruction (or, for a transcoder, block L's MLP output by its prediction from
the MLP's input), and with it zero-ablated; the passes share the forward up to block L
where the model's layout allows (``training.evaluation.passes``). A family
(``evaluate_family``: a sweep's SAEs on the same batches) has one clean pass per batch for
all, each SAE adding only its spliced pass; one SAE takes each chunk's clean and spliced
log-softmax together, a family keeps the clean log-probabilities for every SAE
(``training.evaluation.losses``). With ``records``, the clean half of the evaluation
(everything but the spliced passes) is recorded, and a later evaluation of the same text
at the same block reads it instead of running the model up to block L and the clean
pass: each SAE then costs only its spliced pass (``training.evaluation.records``).
Reported:

* FVU / explained variance: Σ‖x − x̂‖² / Σ‖x − x̄‖² over all non-BOS tokens (of the MLP
  output y and ŷ for a transcoder).
* L0: mean active latents per token; dead fraction: latents that never fired.
* CE loss recovered: (CE_ablate − CE_sae) / (CE_ablate − CE_clean).
* ΔLM loss: CE_sae − CE_clean; KL: mean KL(p_clean ‖ p_sae) per predicted token.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from training.data.corpus import iter_texts
from training.data.models import LoadedModel
from training.data.packing import pack_contexts
from training.evaluation.ablation import hooked
from training.evaluation.losses import (
    clean_kl_terms,
    clean_log_probs,
    pair_losses,
    recorded_losses,
    spliced_losses,
)
from training.evaluation.passes import (
    Passes,
    Splice,
    edited_output,
    shared_passes,
    whole_passes,
)
from training.evaluation.record_key import record_key
from training.evaluation.records import CleanRecords, RecordedBatch, RecordWriter, record_bytes
from training.evaluation.suffix import Suffix
from training.sae.autoencoder import Encoding, SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class EvalMetrics:
    tokens: int
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_sae: float
    ce_ablate: float
    ce_loss_recovered: float
    delta_lm_loss: float
    kl: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Totals:
    """Running sums over batches (all float64 for stable accumulation)."""

    n_latents: int
    tokens: int = 0
    err: float = 0.0
    sq: float = 0.0
    active: float = 0.0
    sums: Tensor | None = None
    fired: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "sae": 0.0,
                                                          "ablate": 0.0})
    kl: float = 0.0
    predicted: int = 0

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, code: Encoding) -> None:
        """x, x_hat [N, d]; the sparse code's values/indices [N, m] (unselected slots 0),
        read as they are: no dense [N, n] latents are built."""
        x64 = x.double()
        self.tokens += x.shape[0]
        self.err += float((x64 - x_hat.double()).pow(2).sum())
        self.sq += float(x64.pow(2).sum())
        self.sums = x64.sum(0) if self.sums is None else self.sums + x64.sum(0)
        active = code.values > 0
        self.active += float(active.sum())
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=active.device)
        fired[code.indices[active]] = True
        self.fired = fired if self.fired.numel() == 0 else self.fired | fired

    def finish(self) -> EvalMetrics:
        variance = self.sq - float((self.sums * self.sums).sum()) / max(1, self.tokens)
        fvu = self.err / max(variance, 1e-12)
        ce = {key: value / max(1, self.predicted) for key, value in self.ce.items()}
        span = ce["ablate"] - ce["clean"]
        recovered = (ce["ablate"] - ce["sae"]) / span if abs(span) > 1e-12 else float("nan")
        return EvalMetrics(
            tokens=self.tokens, fvu=fvu, explained_variance=1 - fvu,
            l0=self.active / max(1, self.tokens),
            dead_fraction=1 - float(self.fired.float().mean()) if self.fired.numel() else 1.0,
            ce_clean=ce["clean"], ce_sae=ce["sae"], ce_ablate=ce["ablate"],
            ce_loss_recovered=recovered, delta_lm_loss=ce["sae"] - ce["clean"],
            kl=self.kl / max(1, self.predicted))


@torch.inference_mode()
def evaluate(lm: LoadedModel, sae: SparseAutoencoder, layer: int,
             contexts: Iterable[Tensor], *, total_tokens: int | None = None,
             progress: bool = True, share_prefix: bool = True,
             records: CleanRecords | None = None) -> EvalMetrics:
    """Metrics of ``sae`` (raw-activation units) at block ``layer`` over batches of contexts
    [B, T] (BOS first); ``share_prefix=False`` runs three whole passes per batch (the
    reference the benchmark compares with); ``records``: see ``evaluate_family``."""
    return evaluate_family(lm, [sae], layer, contexts, total_tokens=total_tokens,
                           progress=progress, share_prefix=share_prefix, records=records)[0]


@torch.inference_mode()
def evaluate_family(lm: LoadedModel, saes: Sequence[SparseAutoencoder], layer: int,
                    contexts: Iterable[Tensor], *, total_tokens: int | None = None,
                    progress: bool = True, share_prefix: bool = True,
                    records: CleanRecords | None = None) -> list[EvalMetrics]:
    """:func:`evaluate` of several SAEs of one site of block ``layer`` (a sweep's) on the
    same batches: each batch's clean pass, its log-probabilities and the ablated CE are
    computed once for all of them, and each SAE adds only its spliced pass (blocks L+1..
    and the LM head). Each SAE's figures are those ``evaluate`` gives it alone.

    With ``records`` (and a model whose forward after block L ``Suffix`` can run), the clean
    half is read from the record of these very batches when there is one, and recorded
    otherwise; ``records.outcome`` then says which ("read", "written", or why neither)."""
    site = _site_of(lm, saes, layer)
    totals = [_Totals(sae.cfg.n_latents) for sae in saes]
    splices = [_splicer(sae.eval(), total) for sae, total in zip(saes, totals, strict=True)]
    suffix = Suffix.of(lm, layer, site) if share_prefix else None
    bar = tqdm(total=total_tokens, unit="tok", desc="eval", disable=not progress)
    with bar:
        if records is not None and _recordable(lm, suffix, records):
            _evaluate_recorded(lm, layer, list(contexts), totals, splices, suffix, records,
                               bar)
        else:
            for ids in contexts:
                ids = ids.to(lm.device)
                _evaluate_batch(lm, layer, ids, totals, splices, suffix, site)
                bar.update(ids.numel() - ids.shape[0])
    if totals[0].tokens == 0:
        raise ValueError("evaluation saw no tokens")
    return [total.finish() for total in totals]


def _site_of(lm: LoadedModel, saes: Sequence[SparseAutoencoder], layer: int) -> str:
    """The one site (``resid`` or ``mlp``) of block ``layer`` that every SAE reads."""
    if not saes:
        raise ValueError("no SAEs to evaluate")
    lm.check_layer(layer)
    for sae in saes:
        if sae.cfg.d_in != lm.d_model:
            raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match {lm.name}'s "
                             f"d={lm.d_model}")
    sites = {sae.cfg.site for sae in saes}
    if len(sites) > 1:
        raise ValueError("SAEs of different sites (residual stream and MLP) are evaluated "
                         "apart: their edits differ")
    return sites.pop()


def _splicer(sae: SparseAutoencoder, totals: _Totals) -> Splice:
    """The edit that splices ``sae`` in, adding its reconstruction error and code to
    ``totals``."""
    def splice(h: Tensor, source: Tensor | None = None) -> Tensor:
        """h [B, T, d] -> the SAE's reconstruction of it (or the transcoder's prediction of
        it from ``source``, the MLP's input) after position 0."""
        source = h if source is None else source
        x = source[:, 1:].reshape(-1, h.shape[-1]).float()
        code = sae.encode(x)
        y_hat = sae.decode(code.values, code.indices, x)
        totals.add_reconstruction(h[:, 1:].reshape(-1, h.shape[-1]).float(), y_hat, code)
        out = h.clone()
        out[:, 1:] = y_hat.reshape(h.shape[0], -1, h.shape[-1]).to(h.dtype)
        return out

    return splice


def _evaluate_batch(lm: LoadedModel, layer: int, ids: Tensor, totals: list[_Totals],
                    splices: list[Splice], suffix: Suffix | None, site: str,
                    writer: RecordWriter | None = None) -> None:
    """One batch: the clean pass (sharing the forward up to block L through ``suffix``, or
    whole when it is None), then each SAE's spliced pass; with ``writer``, what a later
    evaluation of this batch needs of the clean pass is recorded."""
    passes = (whole_passes(lm, layer, ids, site) if suffix is None
              else shared_passes(lm, layer, ids, suffix))
    recording = writer is not None and writer.failure is None
    terms = clean_kl_terms(passes.clean, ids, suffix.head.weight) if recording else None
    ce_clean = _add_spliced_losses(passes, ids, totals, splices)
    if recording:
        writer.add(RecordedBatch(ids, passes.inputs, passes.clean_states, *terms, ce_clean,
                                 passes.ce_ablate))


def _add_spliced_losses(passes: Passes, ids: Tensor, totals: list[_Totals],
                        splices: list[Splice]) -> float:
    """Each SAE's spliced pass and its losses against the clean pass, added to its totals;
    returns the batch's summed CE_clean."""
    if len(splices) == 1:  # nothing to reuse: both log-softmaxes a chunk at a time
        ce_clean, ce_sae, kl = pair_losses(passes.clean, passes.spliced(splices[0]), ids)
        _add_losses(totals[0], ids, ce_clean, passes.ce_ablate, ce_sae, kl)
        return ce_clean
    log_p, ce_clean = clean_log_probs(passes.clean, ids)
    passes.clean = None  # log_p replaces them (in place, or a bf16 model's as a float32 copy)
    for total, splice in zip(totals, splices, strict=True):
        ce_sae, kl = spliced_losses(log_p, passes.spliced(splice), ids)
        _add_losses(total, ids, ce_clean, passes.ce_ablate, ce_sae, kl)
    return ce_clean


def _recordable(lm: LoadedModel, suffix: Suffix | None, records: CleanRecords) -> bool:
    """Whether this evaluation's clean pass can be recorded or read: the forward after
    block L runs alone, the model is float32 and its LM head has no bias (the KL reads the
    mean unembedding: ``training.evaluation.records``), and no hook changes the model."""
    reason = ("the model's forward after block L cannot run alone" if suffix is None
              else "the LM head has a bias" if getattr(suffix.head, "bias", None) is not None
              else "the model is not in float32: a KL read from a record would differ from "
                   "a fresh one by the rounding of its logits"
              if any(p.dtype != torch.float32 for p in lm.model.parameters())
              else "the model carries hooks" if hooked(lm.model) else None)
    records.outcome = f"not recorded: {reason}" if reason else None
    return reason is None


def _evaluate_recorded(lm: LoadedModel, layer: int, batches: list[Tensor],
                       totals: list[_Totals], splices: list[Splice], suffix: Suffix,
                       records: CleanRecords, bar: tqdm) -> None:
    """Every batch from the record of this clean pass, or (with none) computed and
    recorded, the record renamed into place once whole."""
    batches = [ids.to(lm.device) for ids in batches]
    if not batches:
        raise ValueError("evaluation saw no tokens")
    key = record_key(lm, layer, suffix.site, batches)
    recorded = records.read(key, batches, suffix.site, lm.device)
    if recorded is not None:
        log.info("the clean pass of block %d was read from the record %s", layer, key)
        for recorded_file in recorded:
            batch = recorded_file.load()
            _evaluate_from_record(batch, totals, splices, suffix)
            bar.update(batch.ids.numel() - batch.ids.shape[0])
        records.outcome = "read"
        return
    writer = records.writer(key, record_bytes(batches, suffix.site, lm.d_model))
    with writer or nullcontext():
        for ids in batches:
            _evaluate_batch(lm, layer, ids, totals, splices, suffix, suffix.site, writer)
            bar.update(ids.numel() - ids.shape[0])
        if writer is not None:
            records.outcome = writer.commit({
                "model": lm.name, "layer": layer, "site": suffix.site,
                "tokens": sum(ids.numel() - ids.shape[0] for ids in batches)})


def _evaluate_from_record(batch: RecordedBatch, totals: list[_Totals],
                          splices: list[Splice], suffix: Suffix) -> None:
    """One recorded batch: each SAE's spliced pass from the recorded block-L tensors, with
    the block inputs read at block 0 (no forward up to block L), and its losses from the
    recorded clean figures."""
    suffix.read_block_inputs(batch.ids)
    for total, splice in zip(totals, splices, strict=True):
        states = suffix.final(edited_output(batch.inputs, splice))
        ce_sae, kl = recorded_losses(suffix.head(states), states, batch.ids,
                                     batch.clean_states, batch.log_normaliser,
                                     batch.mean_unembed)
        _add_losses(total, batch.ids, batch.ce_clean, batch.ce_ablate, ce_sae, kl)


def _add_losses(total: _Totals, ids: Tensor, ce_clean: float, ce_ablate: float,
                ce_sae: float, kl: float) -> None:
    """Add one batch's summed CEs and KL over the predicted positions of ids [B, T]."""
    total.ce["clean"] += ce_clean
    total.ce["ablate"] += ce_ablate
    total.ce["sae"] += ce_sae
    total.kl += kl
    total.predicted += ids.numel() - ids.shape[0]


def dataset_batches(lm: LoadedModel, dataset: str, *, tokens: int, context: int, batch: int,
                    skip_contexts: int = 0) -> Iterator[Tensor]:
    """Packed contexts [≤batch, context] of ``dataset`` covering ``tokens`` predicted tokens,
    after skipping the first ``skip_contexts`` (e.g. the ones an SAE was trained on)."""
    needed = -(-tokens // (context - 1))
    stream = pack_contexts(iter_texts(dataset), lm.tokenizer, context, lm.bos_id)
    stream = itertools.islice(stream, skip_contexts, skip_contexts + needed)
    while group := list(itertools.islice(stream, batch)):
        yield torch.tensor(group, dtype=torch.long)


def evaluate_sae_on_dataset(lm: LoadedModel, sae: SparseAutoencoder, layer: int, *,
                            dataset: str, tokens: int, context: int = 128, batch: int = 8,
                            skip_contexts: int = 0, progress: bool = True,
                            records: CleanRecords | None = None) -> EvalMetrics:
    return evaluate_family_on_dataset(lm, [sae], layer, dataset=dataset, tokens=tokens,
                                      context=context, batch=batch,
                                      skip_contexts=skip_contexts, progress=progress,
                                      records=records)[0]


def evaluate_family_on_dataset(lm: LoadedModel, saes: Sequence[SparseAutoencoder],
                               layer: int, *, dataset: str, tokens: int, context: int = 128,
                               batch: int = 8, skip_contexts: int = 0, progress: bool = True,
                               records: CleanRecords | None = None) -> list[EvalMetrics]:
    """:func:`evaluate_family` on ``tokens`` predicted tokens of ``dataset``."""
    if tokens < 1:
        raise ValueError("--tokens must be positive")
    if context < 2:
        raise ValueError(f"--context must be at least 2 (got {context})")
    if batch < 1:
        raise ValueError(f"--batch must be positive (got {batch})")
    if skip_contexts < 0:
        raise ValueError(f"--skip-contexts must not be negative (got {skip_contexts})")
    batches = dataset_batches(lm, dataset, tokens=tokens, context=context, batch=batch,
                              skip_contexts=skip_contexts)
    return evaluate_family(lm, saes, layer, batches, total_tokens=tokens, progress=progress,
                           records=records)
