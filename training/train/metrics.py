"""Evaluating an SAE spliced into its model.

For each batch of packed contexts the model runs clean, with block L's output replaced by
the SAE reconstruction, and with it zero-ablated. The three share the forward up to block
L: the clean pass records block L's output and the inputs block L+1 received (rotary
embeddings, mask), and the two edited passes run only blocks L+1.. and the LM head from
the edited output (``_Suffix``; models whose layout it does not know run three whole
passes). The losses are computed a chunk of positions at a time, so the [tokens, vocab]
log-probabilities never exist whole. BOS positions are left untouched in both edits (the
SAE was not trained on them). A transcoder replaces block L's MLP output instead (its
prediction from the MLP's input; zero for the ablation), in three whole passes. Reported:

* FVU / explained variance: Σ‖x − x̂‖² / Σ‖x − x̄‖² over all non-BOS tokens (of the MLP
  output y and ŷ for a transcoder).
* L0: mean active latents per token; dead fraction: latents that never fired.
* CE loss recovered: (CE_ablate − CE_sae) / (CE_ablate − CE_clean).
* ΔLM loss: CE_sae − CE_clean; KL: mean KL(p_clean ‖ p_sae) per predicted token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from training.data.corpus import iter_texts
from training.data.hooks import edit_site
from training.data.models import LoadedModel
from training.data.packing import pack_contexts
from training.sae.autoencoder import SparseAutoencoder, top_columns


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

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        x64 = x.double()
        self.tokens += x.shape[0]
        self.err += float((x64 - x_hat.double()).pow(2).sum())
        self.sq += float(x64.pow(2).sum())
        self.sums = x64.sum(0) if self.sums is None else self.sums + x64.sum(0)
        self.active += float((z > 0).sum())
        fired = (z > 0).any(0).cpu()
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
             progress: bool = True, share_prefix: bool = True) -> EvalMetrics:
    """Metrics of ``sae`` (raw-activation units) at block ``layer`` over batches of contexts
    [B, T] (BOS first); ``share_prefix=False`` runs three whole passes (for comparison)."""
    lm.check_layer(layer)
    if sae.cfg.d_in != lm.d_model:
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match {lm.name}'s d={lm.d_model}")
    sae.eval()
    totals = _Totals(sae.cfg.n_latents)

    def splice(h: Tensor, source: Tensor | None = None) -> Tensor:
        """h [B, T, d] -> the SAE's reconstruction of it (or the transcoder's prediction of
        it from ``source``, the MLP's input) after position 0."""
        source = h if source is None else source
        x = source[:, 1:].reshape(-1, h.shape[-1]).float()
        z = sae.dense_latents(x)
        y_hat = sae.decode(*_sparse(z), x)
        totals.add_reconstruction(h[:, 1:].reshape(-1, h.shape[-1]).float(), y_hat, z)
        out = h.clone()
        out[:, 1:] = y_hat.reshape(h.shape[0], -1, h.shape[-1]).to(h.dtype)
        return out

    def ablate(h: Tensor, _source: Tensor | None = None) -> Tensor:
        out = h.clone()
        out[:, 1:] = 0
        return out

    if sae.cfg.transcoder:
        share_prefix = False  # the edit is inside block L: no shared block-L output
    suffix = _Suffix.of(lm, layer) if share_prefix else None
    bar = tqdm(total=total_tokens, unit="tok", desc="eval", disable=not progress)
    with bar:
        for ids in contexts:
            ids = ids.to(lm.device)
            _evaluate_batch(lm, layer, ids, totals, splice, ablate, suffix, sae.cfg.site)
            bar.update(ids.numel() - ids.shape[0])
    if totals.tokens == 0:
        raise ValueError("evaluation saw no tokens")
    return totals.finish()


def _sparse(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense codes z [B, n] as (values, indices) [B, m] for the sparse decoder."""
    indices, _ = top_columns(z, max(1, int((z > 0).sum(1).max())))
    return z.gather(1, indices), indices


def _evaluate_batch(lm: LoadedModel, layer: int, ids: Tensor, totals: _Totals,
                    splice, ablate, suffix: _Suffix | None, site: str = "resid") -> None:
    """One batch's three passes: sharing the forward up to block L through ``suffix``,
    or (None) as three whole passes (editing block L's output, or its MLP's at ``mlp``)."""
    if suffix is None:
        clean = lm.model(input_ids=ids, use_cache=False).logits
        with edit_site(lm.blocks, layer, site, splice):
            spliced = lm.model(input_ids=ids, use_cache=False).logits
        with edit_site(lm.blocks, layer, site, ablate):
            ablated = lm.model(input_ids=ids, use_cache=False).logits
    else:
        with suffix.recording():
            clean = lm.model(input_ids=ids, use_cache=False).logits
        spliced = suffix.logits(splice(suffix.hidden))
        ablated = suffix.logits(ablate(suffix.hidden))
    _add_losses(totals, clean, spliced, ablated, ids)


LOSS_CHUNK = 512
"""Positions whose [chunk, vocab] log-probabilities are computed at once."""


def _add_losses(totals: _Totals, clean: Tensor, spliced: Tensor, ablated: Tensor,
                ids: Tensor) -> None:
    """Summed next-token CE of the three logits [B, T, V] and KL(clean ‖ spliced), a chunk
    of predicted positions at a time."""
    targets = ids[:, 1:].reshape(-1)
    rows = [logits[:, :-1].reshape(-1, logits.shape[-1]) for logits in (clean, spliced,
                                                                           ablated)]
    for start in range(0, targets.numel(), LOSS_CHUNK):
        part = slice(start, start + LOSS_CHUNK)
        target = targets[part].unsqueeze(1)
        log_p = F.log_softmax(rows[0][part].float(), -1)
        log_q = F.log_softmax(rows[1][part].float(), -1)
        totals.ce["clean"] -= float(log_p.gather(1, target).sum())
        totals.ce["sae"] -= float(log_q.gather(1, target).sum())
        totals.ce["ablate"] += float(F.cross_entropy(rows[2][part].float(), target[:, 0],
                                                     reduction="sum"))
        totals.kl += float((log_p.exp() * (log_p - log_q)).sum())
    totals.predicted += targets.numel()


SHARED_PREFIX_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose blocks after L all take the inputs block L+1 took and whose logits
are the LM head of the final norm, nothing more (others run three whole passes)."""


class _Suffix:
    """The blocks after ``layer``, the final norm and the LM head of a Llama-layout model
    (``model.model.layers`` / ``.norm``, an output embedding), run from an edited block-L
    output with the inputs block L+1 saw in the clean pass."""

    def __init__(self, lm: LoadedModel, layer: int, norm, head) -> None:
        self.lm, self.layer, self.norm, self.head = lm, layer, norm, head
        self.hidden: Tensor | None = None
        self.kwargs: dict = {}

    @classmethod
    def of(cls, lm: LoadedModel, layer: int) -> _Suffix | None:
        inner = getattr(lm.model, "model", None)
        norm, head = getattr(inner, "norm", None), lm.model.get_output_embeddings()
        if getattr(inner, "layers", None) is not lm.blocks or norm is None or head is None:
            return None
        config = lm.model.config
        if getattr(config, "model_type", None) not in SHARED_PREFIX_MODELS:
            return None  # e.g. Granite/Cohere scale the logits after the head
        if len(set(getattr(config, "layer_types", None) or [])) > 1:
            return None  # sliding and full attention mixed: masks differ per block
        return cls(lm, layer, norm, head)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record block L's output and block L+1's keyword inputs during a forward."""
        def keep_output(_module, _inputs, output):
            self.hidden = output[0] if isinstance(output, tuple) else output

        def keep_inputs(_module, _args, kwargs):
            self.kwargs = dict(kwargs)

        blocks = self.lm.blocks
        handles = [blocks[self.layer].register_forward_hook(keep_output)]
        if self.layer + 1 < len(blocks):
            handles.append(blocks[self.layer + 1].register_forward_pre_hook(
                keep_inputs, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def logits(self, h: Tensor) -> Tensor:
        """Logits [B, T, V] of the model with block L's output replaced by h [B, T, d]."""
        for block in self.lm.blocks[self.layer + 1:]:
            out = block(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h))


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
                            skip_contexts: int = 0, progress: bool = True) -> EvalMetrics:
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
    return evaluate(lm, sae, layer, batches, total_tokens=tokens, progress=progress)
