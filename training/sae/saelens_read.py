"""Reading SAE folders written by SAELens (v6 or v5 layout) into saelab's cfg and tensors.

The conversion runs in steps, each a small function: normalise the cfg layout to v6, check
the architecture and hook point, take the weights, the threshold and any finetuning scale
out of the state dict, fold SAELens' run-time transforms into the weights exactly (in
float64), then decide saelab's architecture and write saelab's cfg. How SAELens itself
reads a folder is in :mod:`training.sae.saelens`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from training.sae.saelens import (
    CFG_FILE,
    SAELAB_WEIGHTS_FILE,
    SAELENS_ACTIVATION_SCALER_FILE,
    SAELENS_V5_STORE_STATE_FILE,
    SAELENS_WEIGHTS_FILE,
    SAELENS_WHITENING_FILE,
    SUPPORTED_SAELENS_ARCHITECTURES,
    WEIGHT_NAMES,
    check_shapes,
    pop_jumprelu_threshold,
)
from training.sae.saelens_layout import normalise_layout
from training.sae.saelens_transcoder_read import (
    SAELENS_TRANSCODERS,
    convert_saelens_transcoder,
    is_saelens_transcoder,
)

Weights = dict[str, torch.Tensor]
"""W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] (float64)."""

_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)$")


# -- reading ----------------------------------------------------------------------------
def read_saelens_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an SAE folder saved by SAELens (v6 or v5 layout) or by saelab.

    Returns ``(cfg, tensors)``: ``cfg`` has saelab's keys (architecture ``topk``,
    ``batchtopk`` or ``jumprelu``, d_in, d_sae, k, threshold, model_name, hook_layer,
    hook_name, dtype ``float32``, plus context_size/prepend_bos when known and the
    ``saelens_*`` provenance keys); ``tensors`` are float32 ``W_enc`` [d_in, d_sae],
    ``b_enc``, ``W_dec`` [d_sae, d_in], ``b_dec`` in raw activation space, plus a
    per-latent ``threshold`` [d_sae] for ``jumprelu``.

    A ``jumprelu`` SAE whose thresholds are all equal and that was trained as BatchTopK
    (``metadata.training_architecture``) comes back as ``batchtopk`` with a scalar
    ``threshold``; a ReLU (``standard``) SAE comes back as ``jumprelu`` with zero
    thresholds (ReLU(p)·[p > 0] = ReLU(p)). These are folded into the weights exactly
    (computed in float64): ``rescale_acts_by_decoder_norm``, ``apply_b_dec_to_input: false``,
    a v5 ``finetuning_scaling_factor``, and an ``expected_average_only_in`` scaling factor
    or a ``covariance_whitening`` transform when the folder holds them (SAELens training
    checkpoints). SAELens' transcoders (``transcoder``, ``skip_transcoder`` and their
    ``jumprelu_`` forms) come back as saelab's MLP-site SAEs (``site: "mlp"``, ``skip``),
    read by :mod:`training.sae.saelens_transcoder_read`. Anything else raises ValueError.
    """
    path = Path(path)
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CFG_FILE} in {path}")
    weights_path = path / SAELENS_WEIGHTS_FILE
    if not weights_path.is_file():
        weights_path = path / SAELAB_WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"no {SAELENS_WEIGHTS_FILE} or {SAELAB_WEIGHTS_FILE} in {path}")
    with open(cfg_path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    return convert_saelens_sae(raw, load_file(str(weights_path)), folder=path)


def convert_saelens_sae(raw_cfg: dict[str, Any], state: dict[str, torch.Tensor],
                        folder: Path | None = None
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`read_saelens_folder` on an already-loaded cfg dict and state dict.

    ``folder`` is only used to look for a saved activation scaler / whitening transform.
    """
    if "encoder.weight" in state:
        raise ValueError("this is an EleutherAI sparsify checkpoint (encoder.weight), not an "
                         "SAELens one: load_sae reads it as such")
    cfg, layout = normalise_layout(raw_cfg)
    if is_saelens_transcoder(cfg):
        return convert_saelens_transcoder(cfg, state)
    arch, (d_in, d_sae) = _checked_architecture(cfg), _dims(cfg)
    metadata: dict[str, Any] = cfg["metadata"]
    hook_layer, hook_name = _residual_hook(cfg, metadata)
    rest = {name: value.detach().to("cpu", torch.float64) for name, value in state.items()}
    if arch == "gated":
        arch = _gated_as_jumprelu(rest)
    weights = _pop_weights(rest, d_in, d_sae)
    threshold = _pop_threshold(rest, cfg, arch, d_sae)
    finetuning_scale = _pop_finetuning_scale(rest, cfg)
    if rest:
        raise ValueError(f"unexpected tensors for a {arch} SAE: {', '.join(sorted(rest))}")
    weights = _fold_decoder_scales(weights, cfg, arch, finetuning_scale)
    weights = _fold_input_transforms(weights, cfg, folder)
    out_arch, k, scalar_threshold = _saelab_kind(arch, threshold, cfg, metadata, d_sae)
    tensors = dict(weights)
    if out_arch == "jumprelu":
        assert threshold is not None
        tensors["threshold"] = threshold
    tensors = {name: value.to(torch.float32).contiguous() for name, value in tensors.items()}
    out: dict[str, Any] = {
        "architecture": out_arch, "d_in": d_in, "d_sae": d_sae, "k": k,
        "threshold": scalar_threshold, "model_name": metadata.get("model_name"),
        "hook_layer": hook_layer, "hook_name": hook_name, "dtype": "float32",
        "saelens_layout": layout, "saelens_architecture": cfg["architecture"],
        "saelens_version": metadata.get("sae_lens_version"),
    }
    for key in ("context_size", "prepend_bos"):
        if metadata.get(key) is not None:
            out[key] = metadata[key]
    if metadata.get("hook_name") and metadata["hook_name"] != hook_name:
        out["saelens_hook_name"] = metadata["hook_name"]
    return out, tensors


# -- the steps --------------------------------------------------------------------------
def _checked_architecture(cfg: dict[str, Any]) -> str:
    arch = cfg["architecture"]
    if arch not in SUPPORTED_SAELENS_ARCHITECTURES:
        raise ValueError(f"unsupported SAELens architecture {arch!r}: saelab reads "
                         f"{', '.join((*SUPPORTED_SAELENS_ARCHITECTURES, *SAELENS_TRANSCODERS))}")
    return arch


def _dims(cfg: dict[str, Any]) -> tuple[int, int]:
    try:
        return int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("SAELens cfg needs integer d_in and d_sae") from exc


def _residual_hook(cfg: dict[str, Any], metadata: dict[str, Any]) -> tuple[int, str]:
    """(hook_layer, hook_name) of a residual-stream SAE; attention-output and per-head
    SAEs are refused."""
    if cfg.get("reshape_activations", "none") != "none" or str(
            metadata.get("hook_name") or "").endswith("_z"):
        raise ValueError("hook_z (attention-output) SAEs are not supported: saelab hooks "
                         "the residual stream")
    if metadata.get("hook_head_index") is not None:
        raise ValueError("per-head SAEs (hook_head_index) are not supported")
    return _resid_post_hook(cfg, metadata)


def _gated_as_jumprelu(rest: dict[str, torch.Tensor]) -> str:
    """A gated SAE as the JumpReLU SAE it equals. Its code is [x̃·W_enc + b_gate > 0] ·
    ReLU(x̃·W_mag + b_mag) with W_mag = W_enc·exp(r_mag) (x̃ = x − b_dec); the gate holds
    exactly when x̃·W_mag + b_mag > b_mag − exp(r_mag)·b_gate, so W_enc' = W_mag,
    b_enc' = b_mag and the per-latent threshold θ = b_mag − exp(r_mag)·b_gate."""
    missing = [n for n in ("W_enc", "b_gate", "r_mag", "b_mag") if n not in rest]
    if missing:
        raise ValueError(f"gated SAE weights lack {', '.join(missing)}")
    scale = rest.pop("r_mag").exp()
    b_gate, b_mag = rest.pop("b_gate"), rest.pop("b_mag")
    rest["W_enc"] = rest["W_enc"] * scale
    rest["b_enc"] = b_mag
    rest["threshold"] = b_mag - scale * b_gate
    return "jumprelu"


def _pop_weights(rest: dict[str, torch.Tensor], d_in: int, d_sae: int) -> Weights:
    missing = [name for name in WEIGHT_NAMES if name not in rest]
    if missing:
        raise ValueError(f"SAE weights lack {', '.join(missing)} (have: {', '.join(rest)})")
    weights = {name: rest.pop(name) for name in WEIGHT_NAMES}
    check_shapes(weights, d_in, d_sae)
    return weights


def _pop_threshold(rest: dict[str, torch.Tensor], cfg: dict[str, Any], arch: str,
                   d_sae: int) -> torch.Tensor | None:
    """The per-latent threshold [d_sae]: jumprelu's own, a batchtopk checkpoint's scalar
    expanded, zeros for a ReLU (standard) SAE; None for topk."""
    threshold: torch.Tensor | None = None
    if arch == "jumprelu":
        threshold = pop_jumprelu_threshold(rest, "SAE")
    elif arch == "batchtopk":
        threshold = _batchtopk_threshold(rest, cfg).reshape(-1)
        if threshold.numel() == 1:
            threshold = threshold.expand(d_sae).clone()
    elif arch == "standard":
        if cfg.get("activation_fn", "relu") != "relu":
            raise ValueError(f"unsupported activation {cfg.get('activation_fn')!r} for a "
                             "standard SAE (only relu)")
        threshold = torch.zeros(d_sae, dtype=torch.float64)
    if threshold is not None and threshold.shape != (d_sae,):
        raise ValueError(f"threshold has shape {tuple(threshold.shape)}, expected ({d_sae},)")
    return threshold


def _batchtopk_threshold(rest: dict[str, torch.Tensor], cfg: dict[str, Any]) -> torch.Tensor:
    for name in ("topk_threshold", "threshold"):
        if name in rest:
            return rest.pop(name)
    if cfg.get("threshold") is None:
        raise ValueError("batchtopk SAE has no threshold (tensor or cfg value)")
    return torch.tensor(float(cfg["threshold"]), dtype=torch.float64)


def _pop_finetuning_scale(rest: dict[str, torch.Tensor], cfg: dict[str, Any]
                          ) -> torch.Tensor | None:
    """A v5 per-latent finetuning scaling factor (or the older ``scaling_factor``)."""
    scale = rest.pop("finetuning_scaling_factor", None)
    legacy = rest.pop("scaling_factor", None)
    if scale is None and legacy is not None:
        if not torch.all(legacy == 1) and not cfg.get("finetuning_scaling_factor"):
            raise ValueError("a 'scaling_factor' tensor is present but "
                             "finetuning_scaling_factor is false")
        scale = legacy
    return scale


def _fold_decoder_scales(w: Weights, cfg: dict[str, Any], arch: str,
                         finetuning_scale: torch.Tensor | None) -> Weights:
    """Decoder-norm rescaling (TopK/BatchTopK: pre' = pre·n, W_dec' = W_dec/n) and a
    finetuning scale (z·s @ W_dec = z @ (s[:, None]·W_dec)) folded into the weights."""
    w = dict(w)
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = w["W_dec"].norm(dim=1)
        if not torch.all(norms > 0):
            raise ValueError("cannot fold rescale_acts_by_decoder_norm: a decoder row is zero")
        w["W_enc"], w["b_enc"] = w["W_enc"] * norms, w["b_enc"] * norms
        w["W_dec"] = w["W_dec"] / norms[:, None]
    if finetuning_scale is not None:
        if finetuning_scale.shape != w["b_enc"].shape:
            raise ValueError("finetuning scaling factor has shape "
                             f"{tuple(finetuning_scale.shape)}")
        w["W_dec"] = w["W_dec"] * finetuning_scale[:, None]
    return w


def _fold_input_transforms(w: Weights, cfg: dict[str, Any], folder: Path | None) -> Weights:
    """No b_dec subtraction (x @ W_enc + b_enc = (x − b_dec) @ W_enc + (b_enc + b_dec @
    W_enc)), then the input normalisation (outermost transform last) folded in."""
    w = dict(w)
    if not cfg.get("apply_b_dec_to_input", True):
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    norm = cfg.get("normalize_activations", "none")
    if norm == "none":
        return w
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise ValueError(f"normalize_activations={norm!r} rescales each token at run "
                         "time and cannot be folded into the weights")
    if norm not in ("expected_average_only_in", "covariance_whitening"):
        raise ValueError(f"unsupported normalize_activations={norm!r}")
    scale, whitening = _saved_scaler(folder)
    if norm == "covariance_whitening":
        if whitening is None:
            raise ValueError("normalize_activations='covariance_whitening' but no "
                             f"{SAELENS_WHITENING_FILE} next to the SAE to fold")
        mean, matrix, inverse = whitening
        w["W_enc"], w["W_dec"] = matrix @ w["W_enc"], w["W_dec"] @ inverse
        w["b_dec"] = w["b_dec"] @ inverse + mean
    if norm == "expected_average_only_in" or scale is not None:
        if scale is None:
            raise ValueError(
                "normalize_activations='expected_average_only_in' but the folder holds "
                f"no scaling factor ({SAELENS_ACTIVATION_SCALER_FILE} or "
                f"{SAELENS_V5_STORE_STATE_FILE}); SAELens keeps the factors of hub "
                "releases in pretrained_saes.yaml: load it with SAE.from_pretrained "
                "(which folds it) and save it again")
        w["W_enc"], w["W_dec"], w["b_dec"] = w["W_enc"] * scale, w["W_dec"] / scale, \
            w["b_dec"] / scale
    return w


def _saelab_kind(arch: str, threshold: torch.Tensor | None, cfg: dict[str, Any],
                 metadata: dict[str, Any], d_sae: int
                 ) -> tuple[str, int | None, float | None]:
    """saelab's (architecture, k, scalar threshold): ReLU reads as jumprelu with zero
    thresholds; a jumprelu trained as BatchTopK with one shared threshold is batchtopk."""
    out_arch = "jumprelu" if arch == "standard" else arch
    k = _saelab_k(cfg, metadata)
    scalar_threshold: float | None = None
    trained_as = metadata.get("training_architecture")
    if (out_arch == "batchtopk" or (out_arch == "jumprelu" and trained_as in (
            "batchtopk", "matryoshka_batchtopk"))) and threshold is not None and bool(
            torch.all(threshold == threshold[0])):
        out_arch, scalar_threshold = "batchtopk", float(threshold[0])
    if out_arch == "topk":
        if k is None or int(k) != k or not 1 <= k <= d_sae:
            raise ValueError(f"topk SAE needs an integer k in [1, d_sae] (got {k!r})")
        k = int(k)
    elif out_arch == "jumprelu":
        k = None
    return out_arch, k, scalar_threshold


# -- helpers ----------------------------------------------------------------------------
def _resid_post_hook(cfg: dict[str, Any], metadata: dict[str, Any]) -> tuple[int, str]:
    """saelab's (hook_layer, blocks.L.hook_resid_post) for the SAE's hook point."""
    name = metadata.get("hook_name") or cfg.get("hook_name")
    match = _RESID_HOOK.match(str(name or ""))
    if match:
        layer = int(match.group(1))
        if match.group(2) == "pre":  # resid_pre of block L is resid_post of block L-1
            if layer == 0:
                raise ValueError("blocks.0.hook_resid_pre (the embeddings) is not a "
                                 "residual-stream output saelab can hook")
            layer -= 1
    else:
        hf = _HF_LAYER.match(str(metadata.get("hf_hook_name") or ""))
        if not hf:
            raise ValueError(f"unsupported hook point {name!r}: saelab reads SAEs on "
                             "blocks.L.hook_resid_post (or hook_resid_pre)")
        layer = int(hf.group(1))
    declared = cfg.get("hook_layer", metadata.get("hook_layer"))
    if match and match.group(2) == "post" and declared is not None and int(declared) != layer:
        raise ValueError(f"hook_layer {declared} disagrees with hook_name {name!r}")
    return layer, f"blocks.{layer}.hook_resid_post"


def _saelab_k(cfg: dict[str, Any], metadata: dict[str, Any]) -> int | float | None:
    details = metadata.get("training_architecture_details") or {}
    k = cfg.get("k", details.get("k"))
    if k is None:
        return None
    k = float(k)
    return int(k) if k.is_integer() else k


def _saved_scaler(folder: Path | None
                  ) -> tuple[float | None,
                             tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The activation scaling factor and whitening (mean, M, M⁻¹) saved with a checkpoint."""
    if folder is None:
        return None, None
    scale: float | None = None
    scaler = folder / SAELENS_ACTIVATION_SCALER_FILE
    if scaler.is_file():
        with open(scaler) as f:
            value = json.load(f).get("scaling_factor")
        scale = None if value is None else float(value)
    store = folder / SAELENS_V5_STORE_STATE_FILE
    if scale is None and store.is_file():
        state = load_file(str(store))
        if "estimated_norm_scaling_factor" in state:
            scale = float(state["estimated_norm_scaling_factor"])
    whitening = None
    white = folder / SAELENS_WHITENING_FILE
    if white.is_file():
        w = load_file(str(white))
        whitening = (w["mean"].double(), w["matrix"].double(), w["inverse_matrix"].double())
    return scale, whitening
