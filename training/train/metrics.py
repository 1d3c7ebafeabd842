"""Evaluating an SAE spliced into its model.

For each batch of packed contexts the model runs clean, with block L's output replaced by
the SAE reconstruction, and with it zero-ablated. The three share the forward up to block
L: the clean pass records block L's output and the inputs block L+1 received (rotary
embeddings, mask), and the spliced pass runs only blocks L+1.. and the LM head from the
edited output (``_Suffix``; models whose layout it does not know run three whole passes).
The ablated pass does not depend on the text in those models, so it runs once per (model,
layer, context length) and each batch reads its CE from the cached log-probabilities
(``training.train.ablation``). The losses are computed a chunk of positions at a time
(``training.train.eval_losses``): one SAE takes a chunk's clean and spliced log-softmax
together; a family (``evaluate_family``: a sweep's SAEs on the same batches, one clean pass
for all, each SAE adding only its spliced pass) keeps the clean log-probabilities for every
SAE (in the float32 clean logits' place; a bf16 model's get a float32 copy). BOS positions are left
untouched in both edits (the SAE was not trained on them). A transcoder replaces block L's
MLP output instead (its prediction from the MLP's input; zero for the ablation): the
clean pass also records the residual stream the block adds that output to (the input of
its post-attention norm), and the edited block output is that residual + the edit, as the
block itself adds it, run through the suffix (the ablated pass too, as it depends on the
text there). Reported:

* FVU / explained variance: Σ‖x − x̂‖² / Σ‖x − x̄‖² over all non-BOS tokens (of the MLP
  output y and ŷ for a transcoder).
* L0: mean active latents per token; dead fraction: latents that never fired.
* CE loss recovered: (CE_ablate − CE_sae) / (CE_ablate − CE_clean).
* ΔLM loss: CE_sae − CE_clean; KL: mean KL(p_clean ‖ p_sae) per predicted token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from training.data.corpus import iter_texts
from training.data.hooks import edit_site, mlp_of
from training.data.models import LoadedModel
from training.data.packing import pack_contexts
from training.sae.autoencoder import Encoding, SparseAutoencoder
from training.train.ablation import ablated_log_probs, summed_ce, zero_after_bos
from training.train.eval_losses import (
    clean_log_probs,
    pair_losses,
    spliced_losses,
    summed_ce_of_logits,
)


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
             progress: bool = True, share_prefix: bool = True) -> EvalMetrics:
    """Metrics of ``sae`` (raw-activation units) at block ``layer`` over batches of contexts
    [B, T] (BOS first); ``share_prefix=False`` runs three whole passes per batch (the
    reference the benchmark compares with)."""
    return evaluate_family(lm, [sae], layer, contexts, total_tokens=total_tokens,
                           progress=progress, share_prefix=share_prefix)[0]


@torch.inference_mode()
def evaluate_family(lm: LoadedModel, saes: Sequence[SparseAutoencoder], layer: int,
                    contexts: Iterable[Tensor], *, total_tokens: int | None = None,
                    progress: bool = True, share_prefix: bool = True) -> list[EvalMetrics]:
    """:func:`evaluate` of several SAEs of one site of block ``layer`` (a sweep's) on the
    same batches: each batch's clean pass, its log-probabilities and the ablated CE are
    computed once for all of them, and each SAE adds only its spliced pass (blocks L+1..
    and the LM head). Each SAE's figures are those ``evaluate`` gives it alone."""
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
    site = sites.pop()
    totals = [_Totals(sae.cfg.n_latents) for sae in saes]
    splices = [_splicer(sae.eval(), total) for sae, total in zip(saes, totals, strict=True)]
    suffix = _Suffix.of(lm, layer, site) if share_prefix else None
    bar = tqdm(total=total_tokens, unit="tok", desc="eval", disable=not progress)
    with bar:
        for ids in contexts:
            ids = ids.to(lm.device)
            _evaluate_batch(lm, layer, ids, totals, splices, suffix, site)
            bar.update(ids.numel() - ids.shape[0])
    if totals[0].tokens == 0:
        raise ValueError("evaluation saw no tokens")
    return [total.finish() for total in totals]


Splice = Callable[[Tensor, Tensor | None], Tensor]
"""An edit of block L's output (or its MLP's, given the MLP's input) that splices an SAE."""


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
                    splices: list[Splice], suffix: _Suffix | None, site: str = "resid"
                    ) -> None:
    """One batch: the clean pass (sharing the forward up to block L through ``suffix``, or
    whole when it is None), then each SAE's spliced pass; CE_ablate from the shared
    ablated pass, or a whole zero-ablated pass (editing block L's output, or its MLP's at
    ``mlp``)."""
    if suffix is None:
        clean = lm.model(input_ids=ids, use_cache=False).logits
        with edit_site(lm.blocks, layer, site, zero_after_bos):
            ce_ablate = summed_ce_of_logits(lm.model(input_ids=ids, use_cache=False).logits,
                                            ids)

        def spliced(splice) -> Tensor:
            with edit_site(lm.blocks, layer, site, splice):
                return lm.model(input_ids=ids, use_cache=False).logits
    elif site == "mlp":
        with suffix.recording():
            clean = lm.model(input_ids=ids, use_cache=False).logits
        y, residual = suffix.mlp_out, suffix.mlp_residual  # block L's output: residual + y

        def swapped(edit: Tensor) -> Tensor:
            return suffix.logits(residual + edit)

        ce_ablate = summed_ce_of_logits(swapped(zero_after_bos(y)), ids)

        def spliced(splice) -> Tensor:
            return swapped(splice(y, suffix.mlp_in))
    else:
        ablated = ablated_log_probs(lm, layer, ids)
        with suffix.recording():
            clean = lm.model(input_ids=ids, use_cache=False).logits
        if ablated is not None:
            ce_ablate = summed_ce(ablated, ids)
        else:  # e.g. contexts that start with different tokens
            ce_ablate = summed_ce_of_logits(suffix.logits(zero_after_bos(suffix.hidden)), ids)

        def spliced(splice) -> Tensor:
            return suffix.logits(splice(suffix.hidden))
    if len(splices) == 1:  # nothing to reuse: both log-softmaxes a chunk at a time
        ce_clean, ce_sae, kl = pair_losses(clean, spliced(splices[0]), ids)
        _add_losses(totals[0], ids, ce_clean, ce_ablate, ce_sae, kl)
        return
    log_p, ce_clean = clean_log_probs(clean, ids)
    del clean  # log_p replaces them (in place, or a bf16 model's as a float32 copy)
    for total, splice in zip(totals, splices, strict=True):
        ce_sae, kl = spliced_losses(log_p, spliced(splice), ids)
        _add_losses(total, ids, ce_clean, ce_ablate, ce_sae, kl)


def _add_losses(total: _Totals, ids: Tensor, ce_clean: float, ce_ablate: float,
                ce_sae: float, kl: float) -> None:
    """Add one batch's summed CEs and KL over the predicted positions of ids [B, T]."""
    total.ce["clean"] += ce_clean
    total.ce["ablate"] += ce_ablate
    total.ce["sae"] += ce_sae
    total.kl += kl
    total.predicted += ids.numel() - ids.shape[0]


SHARED_PREFIX_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose blocks after L all take the inputs block L+1 took and whose logits
are the LM head of the final norm, nothing more (others run three whole passes)."""


class _Suffix:
    """The blocks after ``layer``, the final norm and the LM head of a Llama-layout model
    (``model.model.layers`` / ``.norm``, an output embedding), run from an edited block-L
    output with the inputs block L+1 saw in the clean pass. At the ``mlp`` site it also
    records block L's MLP input and output and the residual stream the block adds that
    output to (the input of its ``post_attention_layernorm``): residual + the edit is the
    edited block output, with the block's own rounding."""

    def __init__(self, lm: LoadedModel, layer: int, norm, head, site: str = "resid") -> None:
        self.lm, self.layer, self.norm, self.head, self.site = lm, layer, norm, head, site
        self.hidden: Tensor | None = None
        self.mlp_in: Tensor | None = None
        self.mlp_out: Tensor | None = None
        self.mlp_residual: Tensor | None = None
        self.kwargs: dict = {}

    @classmethod
    def of(cls, lm: LoadedModel, layer: int, site: str = "resid") -> _Suffix | None:
        inner = getattr(lm.model, "model", None)
        norm, head = getattr(inner, "norm", None), lm.model.get_output_embeddings()
        if getattr(inner, "layers", None) is not lm.blocks or norm is None or head is None:
            return None
        config = lm.model.config
        if getattr(config, "model_type", None) not in SHARED_PREFIX_MODELS:
            return None  # e.g. Granite/Cohere scale the logits after the head
        if len(set(getattr(config, "layer_types", None) or [])) > 1:
            return None  # sliding and full attention mixed: masks differ per block
        if site == "mlp" and not hasattr(lm.blocks[layer], "post_attention_layernorm"):
            return None  # no recorded residual to add the edit to
        return cls(lm, layer, norm, head, site)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record block L's output and block L+1's keyword inputs during a forward (and, at
        the mlp site, block L's MLP input and output)."""
        def keep_output(_module, _inputs, output):
            self.hidden = output[0] if isinstance(output, tuple) else output

        def keep_inputs(_module, _args, kwargs):
            self.kwargs = dict(kwargs)

        def keep_mlp(_module, inputs, output):
            self.mlp_in = inputs[0]
            self.mlp_out = output[0] if isinstance(output, tuple) else output

        def keep_residual(_module, inputs):
            self.mlp_residual = inputs[0]

        blocks = self.lm.blocks
        handles = [blocks[self.layer].register_forward_hook(keep_output)]
        if self.layer + 1 < len(blocks):
            handles.append(blocks[self.layer + 1].register_forward_pre_hook(
                keep_inputs, with_kwargs=True))
        if self.site == "mlp":
            handles.append(mlp_of(blocks, self.layer).register_forward_hook(keep_mlp))
            handles.append(blocks[self.layer].post_attention_layernorm
                           .register_forward_pre_hook(keep_residual))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def logits(self, h: Tensor) -> Tensor:
        """Logits [B, T − 1, V] at the positions that predict a token (the last one predicts
        none) of the model with block L's output replaced by h [B, T, d]."""
        for block in self.lm.blocks[self.layer + 1:]:
            out = block(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(h[:, :-1]))


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
    return evaluate_family_on_dataset(lm, [sae], layer, dataset=dataset, tokens=tokens,
                                      context=context, batch=batch,
                                      skip_contexts=skip_contexts, progress=progress)[0]


def evaluate_family_on_dataset(lm: LoadedModel, saes: Sequence[SparseAutoencoder],
                               layer: int, *, dataset: str, tokens: int, context: int = 128,
                               batch: int = 8, skip_contexts: int = 0, progress: bool = True
                               ) -> list[EvalMetrics]:
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
    return evaluate_family(lm, saes, layer, batches, total_tokens=tokens, progress=progress)
