"""Forward hooks on a decoder block's output (the residual stream after block L) and on
its MLP (a transcoder's site: the MLP's input, post-norm, and its output).

Hooks are always installed in context managers so they are removed even when the forward
pass raises (house rule: hooks never leak).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after block L."""


def _hidden(output) -> Tensor:
    """Decoder blocks return a tensor (transformers ≥ 5) or a tuple whose first item it is."""
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def block_output(model: nn.Module, blocks: nn.ModuleList, layer: int,
                 input_ids: Tensor) -> Tensor:
    """Residual stream after block ``layer`` for input_ids [B, T] -> [B, T, d].

    The forward pass stops after that block: later blocks and the LM head are never run,
    which is where capture gets its speed over ``output_hidden_states=True``.
    """
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_hidden(output))
        raise _StopForward

    handle = blocks[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} did not run during the forward pass")
    return captured[0]


def _stopping_capture(model: nn.Module, modules: dict[int, nn.Module], input_ids: Tensor,
                      read: Callable[[tuple, object], Tensor], what: str) -> dict[int, Tensor]:
    """{layer: read(inputs, output)} of each module, from one forward pass that stops after
    the deepest layer's; ``what`` names the modules in the error when one did not run."""
    captured: dict[int, Tensor] = {}
    deepest = max(modules)

    def hook_for(layer: int):
        def hook(_module, inputs, output):
            captured[layer] = read(inputs, output)
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [module.register_forward_hook(hook_for(layer))
               for layer, module in modules.items()]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in modules if layer not in captured]
    if missing:
        raise RuntimeError(f"{what} {missing} did not run during the forward pass")
    return captured


@torch.inference_mode()
def block_outputs(model: nn.Module, blocks: nn.ModuleList, layers: list[int],
                  input_ids: Tensor) -> dict[int, Tensor]:
    """Residual streams after each block of ``layers`` -> {layer: [B, T, d]}, from one
    forward pass that stops after the deepest of them."""
    if len(layers) == 1:
        return {layers[0]: block_output(model, blocks, layers[0], input_ids)}
    captured = _stopping_capture(model, {layer: blocks[layer] for layer in layers}, input_ids,
                                 lambda _inputs, output: _hidden(output), "blocks")
    return {layer: captured[layer] for layer in layers}


@torch.inference_mode()
def mlp_inputs_outputs(model: nn.Module, blocks: nn.ModuleList, layers: list[int],
                       input_ids: Tensor) -> dict[int, Tensor]:
    """Block MLPs' inputs and outputs -> {layer: [B, T, 2d]} (input ‖ output on the last
    axis), from one forward pass that stops after the deepest of those MLPs."""
    captured = _stopping_capture(
        model, {layer: mlp_of(blocks, layer) for layer in layers}, input_ids,
        lambda inputs, output: torch.cat([inputs[0], _hidden(output)], dim=-1),
        "the MLPs of blocks")
    return {layer: captured[layer] for layer in layers}


def site_outputs(model: nn.Module, blocks: nn.ModuleList, layers: list[int],
                 input_ids: Tensor, site: str = "resid") -> dict[int, Tensor]:
    """What an SAE at ``site`` of each block reads: the residual stream [B, T, d]
    (``resid``) or the MLP's input ‖ output [B, T, 2d] (``mlp``)."""
    if site == "mlp":
        return mlp_inputs_outputs(model, blocks, layers, input_ids)
    return block_outputs(model, blocks, layers, input_ids)


def sae_inputs(model: nn.Module, blocks: nn.ModuleList, layer: int, input_ids: Tensor,
               site: str = "resid") -> Tensor:
    """What an SAE at ``site`` of block ``layer`` reads, [B, T, d], from a forward pass
    that stops there: the block's output, or its MLP's input."""
    if site == "mlp":
        both = mlp_inputs_outputs(model, blocks, [layer], input_ids)[layer]
        return both[..., : both.shape[-1] // 2]
    return block_output(model, blocks, layer, input_ids)


@contextmanager
def recording_sae_input(blocks: nn.ModuleList, layer: int, site: str = "resid"
                        ) -> Iterator[list[Tensor]]:
    """Inside the context, each forward pass appends what an SAE at ``site`` of block
    ``layer`` reads ([B, T, d]) to the yielded list; the pass runs to the end."""
    captured: list[Tensor] = []
    if site == "mlp":
        handle = mlp_of(blocks, layer).register_forward_hook(
            lambda _m, inputs, _out: captured.append(inputs[0]))
    else:
        handle = blocks[layer].register_forward_hook(
            lambda _m, _i, out: captured.append(_hidden(out)))
    try:
        yield captured
    finally:
        handle.remove()


POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")
"""Names of a norm applied to the MLP's output inside the block (Gemma 2/3, OLMo 2)."""


def mlp_of(blocks: nn.ModuleList, layer: int) -> nn.Module:
    """Block ``layer``'s MLP (``.mlp`` in Llama-family models). Blocks that normalise the
    MLP's output before adding it are refused: there the MLP's own output is not what
    TransformerLens (and so SAELens) calls ``hook_mlp_out``, so a transcoder of it would
    be saved, and one from elsewhere read, at the wrong point."""
    block = blocks[layer]
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"block {layer} has no .mlp module: transcoders need one")
    norm = next((name for name in POST_MLP_NORMS if hasattr(block, name)), None)
    if norm is not None:
        raise ValueError(f"block {layer} normalises its MLP's output ({norm}): saelab's "
                         "transcoders read and write the MLP itself, which there is not "
                         "the MLP output the block adds; they need a model without a "
                         "post-MLP norm (Llama, Mistral, Qwen)")
    return mlp


@contextmanager
def edit_mlp_output(blocks: nn.ModuleList, layer: int,
                    edit: Callable[[Tensor, Tensor], Tensor]) -> Iterator[None]:
    """Replace block ``layer``'s MLP output y [B, T, d] by ``edit(y, x)`` inside the
    context, x [B, T, d] being the MLP's input (a transcoder reads x and writes y)."""

    def hook(_module, inputs, output):
        return edit(_hidden(output), inputs[0])

    handle = mlp_of(blocks, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_site(blocks: nn.ModuleList, layer: int, site: str,
              edit: Callable[[Tensor, Tensor], Tensor]) -> Iterator[None]:
    """``edit(output, what the SAE reads)`` at ``site``: block L's output (both the same
    tensor) or its MLP's output (and input)."""
    if site == "mlp":
        with edit_mlp_output(blocks, layer, edit):
            yield
    else:
        with edit_block_output(blocks, layer, lambda h: edit(h, h)):
            yield


@contextmanager
def edit_block_output(blocks: nn.ModuleList, layer: int,
                      edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace block ``layer``'s output h [B, T, d] by ``edit(h)`` inside the context.

    Used to splice an SAE's reconstruction into the model (evaluation) and to steer.
    """

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
