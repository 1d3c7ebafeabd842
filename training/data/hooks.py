"""Forward hooks on a decoder block's output (the residual stream after block L).

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


@torch.inference_mode()
def block_outputs(model: nn.Module, blocks: nn.ModuleList, layers: list[int],
                  input_ids: Tensor) -> dict[int, Tensor]:
    """Residual streams after each block of ``layers`` -> {layer: [B, T, d]}, from one
    forward pass that stops after the deepest of them."""
    if len(layers) == 1:
        return {layers[0]: block_output(model, blocks, layers[0], input_ids)}
    captured: dict[int, Tensor] = {}
    deepest = max(layers)

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = _hidden(output)
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in set(layers)]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run during the forward pass")
    return {layer: captured[layer] for layer in layers}


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
