"""Reading transcoders written by SAELens (v6: ``transcoder``, ``skip_transcoder``,
``jumprelu_transcoder``, ``jumprelu_skip_transcoder``) into saelab's cfg and tensors.

SAELens' transcoders (``sae_lens.saes.transcoder``, 6.54.12) encode the input as it is
(``apply_b_dec_to_input`` must be false: ``b_dec`` is the output's bias), code with ReLU
(``transcoder``) or ReLU masked by a per-latent threshold (``jumprelu_*``), and decode
``z @ W_dec + b_dec`` (+ ``x @ W_skip.T`` for the skip forms). saelab's MLP-site SAEs
compute exactly that, so the weights are taken as they are; a ReLU transcoder reads as
JumpReLU with zero thresholds (which ``load_sae`` then runs as BatchTopK at θ = 0, the
same function).

saelab's transcoders read block L's MLP input after its norm and predict the MLP's output,
both of the model's width. So the input hook must be that input, ``blocks.L.mlp.hook_in``
(as circuit-tracer and SAELens' ``HookedSAETransformer`` name it), the output hook
``blocks.L.hook_mlp_out`` (or circuit-tracer's ``blocks.L.mlp.hook_out``, the same tensor
without a post-MLP norm) of the same block, and ``d_out == d_in``; anything else is
refused with the reason. TransformerLens' ``blocks.L.ln2.hook_normalized`` is refused
too: it is taken before the norm's gain, so it is not the MLP's input (SAELens gives that
name to Gemma Scope's transcoders, whose models saelab refuses for transcoders anyway:
Gemma 2/3 normalise the MLP's output, ``training.data.hooks.mlp_of``). A model loaded with
``fold_ln`` (the gain moved into the MLP) is refused for the same reason.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from training.sae.saelens import check_shapes, pop_jumprelu_threshold

SAELENS_TRANSCODERS: dict[str, tuple[bool, bool]] = {
    "transcoder": (False, False), "skip_transcoder": (False, True),
    "jumprelu_transcoder": (True, False), "jumprelu_skip_transcoder": (True, True)}
"""SAELens' transcoder architectures -> (has a per-latent threshold, has a skip path)."""

_MLP_INPUT = re.compile(r"^blocks\.(\d+)\.mlp\.hook_in$")
_BEFORE_GAIN = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")


def is_saelens_transcoder(cfg: dict[str, Any]) -> bool:
    return cfg.get("architecture") in SAELENS_TRANSCODERS


def convert_saelens_transcoder(cfg: dict[str, Any], state: dict[str, torch.Tensor]
                               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """saelab's (cfg, tensors) of a v6-layout SAELens transcoder cfg and its state dict.

    ``tensors``: float32 ``W_enc`` [d, n], ``b_enc`` [n], ``W_dec`` [n, d], ``b_dec`` [d],
    ``threshold`` [n] (zeros for a ReLU transcoder) and, with a skip path, ``W_skip``
    [d, d] (SAELens' [d_out, d_in] orientation, which is saelab's). Raises ValueError."""
    arch = cfg["architecture"]
    jump, skip = SAELENS_TRANSCODERS[arch]
    d_in, d_sae, d_out = _dims(cfg)
    _check_run_time_settings(cfg)
    metadata: dict[str, Any] = cfg.get("metadata") or {}
    layer, hook_name = _mlp_hooks(cfg, metadata)
    rest = {name: value.detach().to("cpu", torch.float32) for name, value in state.items()}
    tensors = {name: _pop(rest, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    check_shapes(tensors, d_in, d_sae)
    tensors["threshold"] = _threshold(rest, jump, d_sae)
    if skip:
        tensors["W_skip"] = _pop(rest, "W_skip")
        if tuple(tensors["W_skip"].shape) != (d_out, d_in):
            raise ValueError(f"W_skip has shape {tuple(tensors['W_skip'].shape)}, expected "
                             f"({d_out}, {d_in})")
    if rest:
        raise ValueError(f"unexpected tensors for an SAELens {arch}: {', '.join(sorted(rest))}")
    out: dict[str, Any] = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "k": _k(metadata),
        "threshold": None, "site": "mlp", "skip": skip,
        "model_name": metadata.get("model_name"), "hook_layer": layer,
        "hook_name": f"blocks.{layer}.mlp.hook_in",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out", "dtype": "float32",
        "saelens_layout": "v6", "saelens_architecture": arch,
        "saelens_version": metadata.get("sae_lens_version")}
    if hook_name != out["hook_name"]:
        out["saelens_hook_name"] = hook_name
    for key in ("context_size", "prepend_bos"):
        if metadata.get(key) is not None:
            out[key] = metadata[key]
    return out, {name: value.contiguous() for name, value in tensors.items()}


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int]:
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg.get("d_out", d_in))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("SAELens transcoder cfg needs integer d_in, d_sae and d_out") from exc
    if d_out != d_in:
        raise ValueError(f"a transcoder from width {d_in} to {d_out}: saelab's transcoders "
                         "predict a block's MLP output from its input, both the model's width")
    return d_in, d_sae, d_out


def _check_run_time_settings(cfg: dict[str, Any]) -> None:
    """What saelab's MLP-site SAE cannot run: b_dec subtracted from the input (SAELens
    refuses it too), a run-time input normalisation, an activation other than ReLU."""
    if cfg.get("apply_b_dec_to_input", True):  # SAELens' default, which it refuses here
        raise ValueError("apply_b_dec_to_input is true or missing: a transcoder's b_dec is "
                         "its output bias (SAELens refuses this cfg too)")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise ValueError(f"normalize_activations={norm!r}: saelab reads transcoders that "
                         "work on the raw MLP input ('none')")
    activation = cfg.get("activation_fn", "relu")
    if activation != "relu":
        raise ValueError(f"unsupported activation {activation!r} for a transcoder (relu)")


def _mlp_hooks(cfg: dict[str, Any], metadata: dict[str, Any]) -> tuple[int, str]:
    """(layer, hook_name) of a transcoder from block L's MLP input to its
    output; the hooks saelab cannot run are refused."""
    name = str(metadata.get("hook_name") or cfg.get("hook_name") or "")
    if _BEFORE_GAIN.match(name):
        raise ValueError(f"a transcoder reading {name!r}, TransformerLens' norm output "
                         "before its gain: saelab's transcoders read the MLP's own input, "
                         "after the gain (blocks.L.mlp.hook_in)")
    match = _MLP_INPUT.match(name)
    if not match:
        raise ValueError(f"a transcoder reading {name or 'an unnamed hook'!r}: saelab's "
                         "transcoders read block L's MLP input after its norm "
                         "(blocks.L.mlp.hook_in)")
    kwargs = metadata.get("model_from_pretrained_kwargs") or {}
    if isinstance(kwargs, dict) and kwargs.get("fold_ln"):
        raise ValueError("a transcoder of a model loaded with fold_ln: its MLP input "
                         "lacks the norm's gain, which saelab's MLP input has")
    layer = int(match.group(1))
    out = str(metadata.get("hook_name_out") or cfg.get("hook_name_out") or "")
    if out not in (f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_out"):
        raise ValueError(f"a transcoder writing {out or 'an unnamed hook'!r}: saelab's "
                         f"transcoders predict the MLP output of the block they read "
                         f"(blocks.{layer}.hook_mlp_out or blocks.{layer}.mlp.hook_out)")
    return layer, name


def _pop(rest: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in rest:
        raise ValueError(f"transcoder weights lack {name} (have: {', '.join(rest)})")
    return rest.pop(name)


def _threshold(rest: dict[str, torch.Tensor], jump: bool, d_sae: int) -> torch.Tensor:
    """The per-latent threshold [d_sae]: a JumpReLU transcoder's own, zeros for ReLU."""
    if not jump:
        return torch.zeros(d_sae)
    threshold = pop_jumprelu_threshold(rest, "transcoder")
    if tuple(threshold.shape) != (d_sae,):
        raise ValueError(f"threshold has shape {tuple(threshold.shape)}, expected ({d_sae},)")
    return threshold


def _k(metadata: dict[str, Any]) -> int | None:
    k = (metadata.get("training_architecture_details") or {}).get("k")
    return int(k) if isinstance(k, int | float) and float(k).is_integer() else None
