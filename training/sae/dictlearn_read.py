"""Reading SAE folders written by dictionary_learning (Marks, Karvonen and Mueller).

Its ``trainSAE`` saves each trainer's dictionary as ``ae.pt`` (the module's state dict,
``torch.save``) beside ``config.json``: ``{"trainer": {"dict_class", "activation_dim",
"dict_size", "k", "layer", "lm_name", "submodule_name", ...}, "buffer": {"d_submodule",
"io", "ctx_len", ...}}``. With ``normalize_activations`` it scales the biases back before
saving, so the weights already work on raw activations: nothing to fold.

Each class below, with x̃ = x − b_dec, converts exactly (in float64) to a saelab SAE in
SAELens' tensor names (W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]):

* ``AutoEncoderTopK`` — TopK_k(ReLU(encoder(x̃))), x̂ = decoder(z) + b_dec: ``topk`` (its
  ``threshold`` buffer is only read by ``encode(use_threshold=True)``).
* ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE`` — inference ReLU(p)·[ReLU(p) > θ] with the
  learned scalar θ: ``batchtopk`` (θ < 0, never learned, keeps every positive latent: 0).
* ``AutoEncoder`` — ReLU(encoder(x − bias)), x̂ = decoder(f) + bias, with the decoder
  columns made unit-norm as its ``from_pretrained`` does (f·‖column‖): ReLU, i.e.
  ``jumprelu`` with zero thresholds (``load_sae`` reads equal thresholds as batchtopk).
* ``AutoEncoderNew`` — ReLU(encoder(x)), x̂ = decoder(f) with its bias: the same, b_dec
  folded into b_enc.
* ``JumpReluAutoEncoder`` — ReLU(p)·[p > θ_f] with p = x·W_enc + b_enc (b_dec is not
  subtracted): ``jumprelu``, b_enc' = b_enc + b_dec·W_enc.
* ``GatedAutoEncoder`` — [x̃·W + b_gate > 0]·ReLU(x̃·W·e^r + b_mag): the ``jumprelu`` SAE it
  equals (W' = W·e^r, b_enc' = b_mag, θ = b_mag − e^r·b_gate).

Sites: saelab reads the residual stream, the output of decoder block L. ``layer`` with a
``submodule_name`` like ``resid_post_layer_L`` (or none: the library's own
``get_submodule`` is the block) is block L's output, or block L−1's when the buffer read
the block's input (``io: in``); MLP, attention, embedding and transcoder sites are refused.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.sae.saelens import check_shapes

WEIGHTS = "ae.pt"
CONFIG = "config.json"
SOURCE_FORMAT = "dictionary_learning"
_RESIDUAL = re.compile(r"^(?:resid_(?:post|out)_layer_?|(?:model\.)?layers\.)(\d+)$")
_OTHER_SITES = (("transcoder", "a transcoder"), ("mlp", "an MLP output"),
                ("attn", "an attention output"), ("attention", "an attention output"),
                ("embed", "the embeddings"))

Converted = tuple[dict[str, Tensor], str, int | None, Tensor | None]
"""(SAELens-named float64 weights, saelab architecture, k, threshold: [n] for jumprelu,
a scalar for batchtopk, None for topk)."""


def is_dictlearn(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def read_dictlearn_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(saelab cfg, float32 tensors in SAELens' names, plus ``threshold`` [n] for jumprelu)
    of a dictionary_learning folder; ValueError for what saelab cannot run."""
    trainer, buffer = _config(folder / CONFIG)
    dict_class = trainer.get("dict_class")
    convert = CONVERTERS.get(str(dict_class))
    if convert is None:
        raise ValueError(f"dictionary_learning dict_class {dict_class!r} is not supported: "
                         f"saelab reads {', '.join(CONVERTERS)}")
    state = _state_dict(folder / WEIGHTS)
    weights, arch, k, threshold = convert(state, trainer)
    if state:
        raise ValueError(f"unexpected tensors in {WEIGHTS} for a {dict_class}: "
                         f"{', '.join(sorted(state))}")
    d_in, d_sae = weights["W_enc"].shape
    check_shapes(weights, d_in, d_sae)
    _check_size(trainer, buffer, d_in, d_sae)
    tensors = {name: value.float().contiguous() for name, value in weights.items()}
    if arch == "jumprelu":
        assert threshold is not None
        tensors["threshold"] = threshold.float().contiguous()
    layer = residual_layer(trainer, buffer)
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d_in, "d_sae": d_sae, "k": k,
        "threshold": float(threshold) if arch == "batchtopk" else None,
        "dtype": "float32", "source_format": SOURCE_FORMAT, "dictlearn_class": dict_class,
        "model_name": trainer.get("lm_name") or None, "hook_layer": layer,
        "hook_name": None if layer is None else f"blocks.{layer}.hook_resid_post"}
    if isinstance(buffer.get("ctx_len"), int):
        cfg["context_size"] = buffer["ctx_len"]
    return cfg, tensors


def residual_layer(trainer: dict[str, Any], buffer: dict[str, Any]) -> int | None:
    """The block whose output the SAE reads (None when the config does not say)."""
    layer = trainer.get("layer")
    if layer is not None and (not isinstance(layer, int) or layer < 0):
        raise ValueError(f"config.json's trainer.layer must be a block index (got {layer!r})")
    name = trainer.get("submodule_name")
    if name:
        lowered = str(name).lower()
        for word, site in _OTHER_SITES:
            if word in lowered:
                raise ValueError(f"submodule {name!r} is {site}: saelab reads SAEs on the "
                                 "residual stream (the output of a decoder block)")
        match = _RESIDUAL.match(str(name))
        if not match:
            raise ValueError(f"unrecognised submodule_name {name!r}: saelab reads SAEs on "
                             "the residual stream (resid_post_layer_L, the output of block L)")
        if layer is not None and int(match.group(1)) != layer:
            raise ValueError(f"submodule_name {name!r} disagrees with layer {layer}")
        layer = int(match.group(1))
    io = buffer.get("io", "out")
    if io not in ("in", "out"):
        raise ValueError(f"the buffer read {io!r} (a transcoder's input and output): saelab "
                         "reads SAEs on the residual stream")
    if io == "out" or layer is None:
        return layer
    if layer == 0:
        raise ValueError("the input of block 0 (the embeddings) is not a residual-stream "
                         "output saelab can hook")
    return layer - 1  # block L's input is block L−1's output


# -- the classes ------------------------------------------------------------------------
def _topk(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    weights, _ = _linear_weights(state)  # its threshold: encode(use_threshold=True) only
    return weights, "topk", _k(state, trainer), None


def _batchtopk(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    weights, threshold = _linear_weights(state)
    return weights, "batchtopk", _k(state, trainer), threshold.clamp_min(0)


def _matryoshka(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    w_enc, b_enc, w_dec, b_dec, threshold = _take(state, "W_enc", "b_enc", "W_dec", "b_dec",
                                                  "threshold")
    state.pop("group_sizes", None)  # nested training groups; inference is BatchTopK's
    weights = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    return weights, "batchtopk", _k(state, trainer), threshold.clamp_min(0)


def _relu(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    bias, w, b, dec = _take(state, "bias", "encoder.weight", "encoder.bias", "decoder.weight")
    norms = dec.norm(dim=0)  # [n]: from_pretrained makes each decoder column unit-norm
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    weights = {"W_enc": (w * norms[:, None]).T, "b_enc": b * norms,
               "W_dec": (dec / norms).T, "b_dec": bias}
    return weights, "jumprelu", None, torch.zeros_like(b)


def _relu_new(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    w, b, dec, dec_bias = _take(state, "encoder.weight", "encoder.bias", "decoder.weight",
                                "decoder.bias")
    weights = {"W_enc": w.T, "b_enc": b + w @ dec_bias, "W_dec": dec.T, "b_dec": dec_bias}
    return weights, "jumprelu", None, torch.zeros_like(b)


def _jumprelu(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    w_enc, b_enc, w_dec, b_dec, threshold = _take(state, "W_enc", "b_enc", "W_dec", "b_dec",
                                                  "threshold")
    weights = {"W_enc": w_enc, "b_enc": b_enc + b_dec @ w_enc, "W_dec": w_dec, "b_dec": b_dec}
    return weights, "jumprelu", None, threshold


def _gated(state: dict[str, Tensor], trainer: dict[str, Any]) -> Converted:
    b_dec, w, r_mag, b_gate, b_mag, dec = _take(state, "decoder_bias", "encoder.weight",
                                                "r_mag", "gate_bias", "mag_bias",
                                                "decoder.weight")
    scale = r_mag.exp()
    weights = {"W_enc": (w * scale[:, None]).T, "b_enc": b_mag, "W_dec": dec.T, "b_dec": b_dec}
    return weights, "jumprelu", None, b_mag - scale * b_gate


CONVERTERS: dict[str, Callable[[dict[str, Tensor], dict[str, Any]], Converted]] = {
    "AutoEncoderTopK": _topk, "BatchTopKSAE": _batchtopk,
    "MatryoshkaBatchTopKSAE": _matryoshka, "AutoEncoder": _relu,
    "AutoEncoderNew": _relu_new, "JumpReluAutoEncoder": _jumprelu,
    "GatedAutoEncoder": _gated}
"""The dictionary classes saelab reads, by the ``dict_class`` name config.json holds."""


# -- helpers ----------------------------------------------------------------------------
def _config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path.name} is not valid JSON: {exc}") from exc
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise ValueError(f"{path.name} has no 'trainer' object (dictionary_learning's layout)")
    buffer = config.get("buffer")
    return trainer, buffer if isinstance(buffer, dict) else {}


def _state_dict(path: Path) -> dict[str, Tensor]:
    """The saved state dict, floats as float64; ``weights_only`` never runs pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path.name} is not a readable state dict: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path.name} does not hold a state dict of tensors")
    return {name: value.double() if value.is_floating_point() else value
            for name, value in state.items()}


def _take(state: dict[str, Tensor], *names: str) -> list[Tensor]:
    missing = [name for name in names if name not in state]
    if missing:
        raise ValueError(f"{WEIGHTS} lacks {', '.join(missing)} (has: {', '.join(state)})")
    return [state.pop(name) for name in names]


def _linear_weights(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The (Batch)TopK classes' nn.Linear layout: (W_enc, b_enc, W_dec, b_dec), threshold."""
    w, b, dec, b_dec, threshold = _take(state, "encoder.weight", "encoder.bias",
                                        "decoder.weight", "b_dec", "threshold")
    return {"W_enc": w.T, "b_enc": b, "W_dec": dec.T, "b_dec": b_dec}, threshold


def _k(state: dict[str, Tensor], trainer: dict[str, Any]) -> int:
    """k from the ``k`` buffer, which must agree with config.json's (as from_pretrained)."""
    saved = int(_take(state, "k")[0])
    if trainer.get("k") is not None and int(trainer["k"]) != saved:
        raise ValueError(f"config.json says k={trainer['k']} but {WEIGHTS} holds k={saved}")
    return saved


def _check_size(trainer: dict[str, Any], buffer: dict[str, Any], d_in: int,
                d_sae: int) -> None:
    for where, key, value in (("trainer", "activation_dim", d_in),
                              ("trainer", "dict_size", d_sae), ("buffer", "d_submodule", d_in)):
        declared = (trainer if where == "trainer" else buffer).get(key)
        if declared is not None and int(declared) != value:
            raise ValueError(f"config.json's {where}.{key} is {declared} but the weights in "
                             f"{WEIGHTS} have {value}")
