"""The part of a forward pass after block L, run from an edited block-L output.

The clean, spliced and ablated passes of an evaluation share the forward up to block L:
the clean pass records block L's output and the inputs block L+1 received (rotary
embeddings, mask), and each edited pass runs only the blocks after L, the final norm and
the LM head. A Llama-layout model passes the same keyword inputs to every block, so those
inputs can also be read at block 0, after the embeddings alone (``read_block_inputs``):
what a recorded clean pass (``training.evaluation.records``) needs to run an edited pass
without the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from training.data.hooks import mlp_of
from training.data.models import LoadedModel

SHARED_PREFIX_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose blocks after L all take the inputs block L+1 took and whose logits
are the LM head of the final norm, nothing more (others run three whole passes)."""


class _InputsRead(Exception):
    """Ends a forward at block 0 once its keyword inputs are read."""


class Suffix:
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
        self.final_states: Tensor | None = None
        self.kwargs: dict = {}

    @classmethod
    def of(cls, lm: LoadedModel, layer: int, site: str = "resid") -> Suffix | None:
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
        """Record block L's output, block L+1's keyword inputs and the final norm's output
        during a forward (and, at the mlp site, block L's MLP input and output and the
        residual it is added to)."""
        def keep_output(_module, _inputs, output):
            self.hidden = output[0] if isinstance(output, tuple) else output

        def keep_final(_module, _inputs, output):
            self.final_states = output[:, :-1]

        def keep_inputs(_module, _args, kwargs):
            self.kwargs = dict(kwargs)

        def keep_mlp(_module, inputs, output):
            self.mlp_in = inputs[0]
            self.mlp_out = output[0] if isinstance(output, tuple) else output

        def keep_residual(_module, inputs):
            self.mlp_residual = inputs[0]

        blocks = self.lm.blocks
        handles = [blocks[self.layer].register_forward_hook(keep_output),
                   self.norm.register_forward_hook(keep_final)]
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

    def read_block_inputs(self, ids: Tensor) -> None:
        """Set the keyword inputs the blocks take for contexts ids [B, T] (rotary
        embeddings, mask, positions) from a forward stopped at block 0: the embeddings
        and nothing more, instead of the whole prefix."""
        def keep_and_stop(_module, _args, kwargs):
            self.kwargs = dict(kwargs)
            raise _InputsRead

        handle = self.lm.blocks[0].register_forward_pre_hook(keep_and_stop, with_kwargs=True)
        try:
            self.lm.model(input_ids=ids, use_cache=False)
        except _InputsRead:
            pass
        finally:
            handle.remove()

    def final(self, h: Tensor) -> Tensor:
        """The final norm's output [B, T − 1, d] at the positions that predict a token (the
        last one predicts none) of the model with block L's output replaced by h [B, T, d]:
        the LM head's input."""
        for block in self.lm.blocks[self.layer + 1:]:
            out = block(h, **self.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h[:, :-1])

    def logits(self, h: Tensor) -> Tensor:
        """Logits [B, T − 1, V] of the model with block L's output replaced by h [B, T, d]
        (see ``final``)."""
        return self.head(self.final(h))
