"""The zero-ablated pass of the evaluation, computed once per (model, layer, context length).

Zero-ablating block L's output after position 0 leaves the model nothing of the text: every
position t ≥ 1 holds h = 0 after block L, and position 0 holds the state of the first token
alone (under the causal mask it attends only to itself in every block before). In a
Llama-layout model (the allow-list of ``suffix.Suffix``: rotary positions only, blocks that
take nothing but the residual stream, the rotary embeddings and the causal mask; packed
contexts, no padding) each later block then sees inputs that depend on the position only, so
the ablated log-probabilities at position t are the same for every context that starts with
the same token. They are computed once, from one context, and each batch's CE_ablate is a
gather of −log p_t(y_t) from them: exact, up to float rounding (see tests/test_eval.py).

The result is kept per model (weakly: it goes with the model) for the last (layer, first
token, weights) it was computed for, at the longest context length seen (a shorter context
reads its first rows: position t never depends on later ones). It is recomputed when any
parameter or buffer is replaced or changed in place (their storage and version counters are
part of the key), and not used while any module of the model carries a forward hook (a
steering edit, say), which would make the ablated pass something else.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from training.data.hooks import edit_site
from training.data.models import LoadedModel


def zero_after_bos(h: Tensor, _source: Tensor | None = None) -> Tensor:
    """The ablation: h [B, T, d] with every position after 0 set to zero (a copy)."""
    out = h.clone()
    out[:, 1:] = 0
    return out


@dataclass(frozen=True)
class _Entry:
    key: tuple
    log_probs: Tensor
    """[T − 1, V] float32: log p_t(·) of the ablated model at positions 0..T−2."""


_MEMO: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def ablated_log_probs(lm: LoadedModel, layer: int, ids: Tensor) -> Tensor | None:
    """log p_t(v) [T − 1, V] (float32) of ``lm`` with block ``layer``'s output zeroed after
    position 0, for the positions 0..T−2 of the contexts ids [B, T]; None where they cannot
    be shared (the contexts start with different tokens, or the model carries hooks).

    Call it only for models ``suffix.Suffix`` accepts, at the residual stream (a
    transcoder's ablation zeroes the MLP output, which leaves block L's output dependent on
    the text)."""
    first = ids[:, 0]
    if ids.shape[1] < 2 or bool((first != first[0]).any()) or hooked(lm.model):
        return None
    fingerprint = weights_fingerprint(lm.model)
    if fingerprint is None:
        return None
    key = (layer, int(first[0]), fingerprint)
    length = ids.shape[1] - 1
    entry = _MEMO.get(lm.model)
    if entry is None or entry.key != key or entry.log_probs.shape[0] < length:
        # One context: only its first token matters, and it is the batch's first token.
        with edit_site(lm.blocks, layer, "resid", zero_after_bos):
            logits = lm.model(input_ids=ids[:1], use_cache=False).logits[0, :-1]
        entry = _Entry(key, F.log_softmax(logits.float(), -1))
        _MEMO[lm.model] = entry
    return entry.log_probs[:length]


def summed_ce(log_probs: Tensor, ids: Tensor) -> float:
    """Σ −log p_t(y_t) over the predicted positions of ids [B, T], from the shared
    log-probabilities [≥ T − 1, V]."""
    targets = ids[:, 1:].T  # [T − 1, B]: row t holds every context's token t + 1
    return -float(log_probs[: targets.shape[0]].gather(1, targets).double().sum())


def weights_fingerprint(model: nn.Module) -> tuple | None:
    """Storage and in-place version of every parameter and buffer (the key changes when a
    weight is replaced, moved, cast or edited); None for weights made in inference mode,
    which keep no version counter."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def hooked(model: nn.Module) -> bool:
    """Any forward hook of ours or a caller's on the model. transformers' own
    output-recording hooks (installed once something asks for hidden states or attentions,
    and left in place) only read outputs, so they do not count."""
    return any(not _library_hook(hook) for m in model.modules()
               for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _library_hook(hook) -> bool:
    return getattr(hook, "__module__", "").startswith("transformers.")
