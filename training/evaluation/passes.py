"""One batch's forward passes: clean, zero-ablated, and spliced (as a function of the edit).

Either three whole passes (models whose layout ``Suffix`` does not know), or one clean pass
that records what the edited passes start from, which then run only the blocks after L
and the LM head (``Suffix``). An SAE's ablated pass does not depend on the text in those
models and is read from ``training.evaluation.ablation``'s one-context pass; a
transcoder's (its MLP's output zeroed) does, and runs per batch from the recorded
residual. BOS positions are left untouched by every edit (the SAE was not trained on them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from training.data.hooks import edit_site
from training.data.models import LoadedModel
from training.evaluation.ablation import ablated_log_probs, summed_ce, zero_after_bos
from training.evaluation.losses import summed_ce_of_logits
from training.evaluation.suffix import Suffix

Splice = Callable[[Tensor, Tensor | None], Tensor]
"""An edit of block L's output (or its MLP's, given the MLP's input) that splices an SAE."""


@dataclass
class Passes:
    clean: Tensor | None
    """The clean logits [B, ≥ T − 1, V] (None once their log-probabilities replace them)."""
    ce_ablate: float
    """Σ next-token CE of the zero-ablated model over the batch's predicted positions."""
    spliced: Callable[[Splice], Tensor]
    """The logits [B, ≥ T − 1, V] with an SAE spliced in by that edit."""
    inputs: dict[str, Tensor]
    """What the edited passes start from ([B, T, d] each; empty for whole passes):
    ``hidden`` (block L's output), or ``mlp_in``, ``mlp_out`` and ``residual`` at the
    ``mlp`` site (block L's output is residual + mlp_out)."""
    clean_states: Tensor | None = None
    """The clean final norm's output [B, T − 1, d], the LM head's input (shared passes)."""


def whole_passes(lm: LoadedModel, layer: int, ids: Tensor, site: str) -> Passes:
    """The clean and ablated passes of ids [B, T] run whole, and the spliced one too."""
    clean = lm.model(input_ids=ids, use_cache=False).logits
    with edit_site(lm.blocks, layer, site, zero_after_bos):
        ce_ablate = summed_ce_of_logits(lm.model(input_ids=ids, use_cache=False).logits, ids)

    def spliced(splice: Splice) -> Tensor:
        with edit_site(lm.blocks, layer, site, splice):
            return lm.model(input_ids=ids, use_cache=False).logits

    return Passes(clean, ce_ablate, spliced, {})


def shared_passes(lm: LoadedModel, layer: int, ids: Tensor, suffix: Suffix) -> Passes:
    """The clean pass of ids [B, T] recorded at block L; the edited passes run ``suffix``
    from there."""
    if suffix.site == "mlp":
        with suffix.recording():
            clean = lm.model(input_ids=ids, use_cache=False).logits
        inputs = {"mlp_in": suffix.mlp_in, "mlp_out": suffix.mlp_out,
                  "residual": suffix.mlp_residual}
        ce_ablate = summed_ce_of_logits(
            suffix.logits(edited_output(inputs, zero_after_bos)), ids)
    else:
        ablated = ablated_log_probs(lm, layer, ids)
        with suffix.recording():
            clean = lm.model(input_ids=ids, use_cache=False).logits
        inputs = {"hidden": suffix.hidden}
        if ablated is not None:
            ce_ablate = summed_ce(ablated, ids)
        else:  # e.g. contexts that start with different tokens
            ce_ablate = summed_ce_of_logits(
                suffix.logits(edited_output(inputs, zero_after_bos)), ids)

    def spliced(splice: Splice) -> Tensor:
        return suffix.logits(edited_output(inputs, splice))

    return Passes(clean, ce_ablate, spliced, inputs, suffix.final_states)


def edited_output(inputs: dict[str, Tensor], edit: Splice) -> Tensor:
    """Block L's output [B, T, d] with ``edit`` applied: to the output itself, or to its
    MLP's output, added to the recorded residual as the block adds it (``mlp`` site)."""
    if "hidden" in inputs:
        return edit(inputs["hidden"], None)
    return inputs["residual"] + edit(inputs["mlp_out"], inputs["mlp_in"])
