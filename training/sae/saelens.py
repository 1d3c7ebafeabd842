"""Conversion between saelab's SAE folders and SAELens' on-disk format.

Pure dict/tensor code: nothing here imports ``sae_lens``. The layout was read from the
SAELens source (``sae_lens`` 6.54.12: ``saes/sae.py``, ``saes/topk_sae.py``,
``saes/jumprelu_sae.py``, ``saes/batchtopk_sae.py``, ``loading/pretrained_sae_loaders.py``,
``training/activation_scaler.py``; and the 5.11.0 ``sae.py`` for the v5 layout) and
checked by loading folders with ``SAE.load_from_disk``.

How SAELens reads a folder (``SAE.load_from_disk(path)``, ``sae_lens_disk_loader``):

* ``cfg.json`` is read as a dict. If neither ``sae_lens_version`` nor
  ``metadata.sae_lens_version`` is >= 6 it goes through ``handle_pre_6_0_config`` (the v5
  layout: flat keys, ``activation_fn_str``/``activation_fn_kwargs: {"k": ...}``, model and
  hook information at the top level). Otherwise it is the v6 layout: ``architecture``
  picks the inference class (``topk``, ``jumprelu``, ``standard``, ``gated``, ...), the
  class's dataclass fields are taken from the top level (unknown keys are silently
  dropped, so saelab's own keys may sit beside them) and ``metadata`` (model_name,
  hook_name, context_size, prepend_bos, ...) is a nested dict.
* Weights come only from ``sae_weights.safetensors`` (``sae.safetensors`` is the name of
  EleutherAI *Sparsify* checkpoints, which SAELens reads with a different, opt-in
  converter). Every tensor is cast to ``cfg["dtype"]`` (which must be present) and loaded
  with a strict ``load_state_dict``: the file must hold exactly ``W_enc`` [d_in, d_sae],
  ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] (+ ``threshold`` [d_sae]
  for ``jumprelu``), nothing more.
* Encoding: ``sae_in = x - b_dec`` (if ``apply_b_dec_to_input``), ``pre = sae_in @ W_enc +
  b_enc``; ``topk``: ReLU of the k largest ``pre`` (top-k first, then ReLU — the same
  tensor as saelab's ReLU-then-top-k, because ReLU is monotone);
  ``jumprelu``: ``ReLU(pre) * (pre > threshold)``. Decoding: ``z @ W_dec + b_dec``.
  ``normalize_activations`` other than ``"none"`` changes the input at run time
  (``layer_norm``, ``constant_norm_rescale``) or is silently ignored by ``load_from_disk``
  (``expected_average_only_in``: the factor is only known for hub releases).

saelab's ``batchtopk`` has no inference architecture in SAELens: SAELens itself saves its
BatchTopK SAEs as ``jumprelu`` with a per-latent threshold equal to the learned scalar
threshold and records ``metadata.training_architecture = "batchtopk"``. We do the same.
The maths is identical: saelab computes ``p = ReLU(pre)``, ``z = p * (p > θ)``; SAELens
computes ``ReLU(pre) * (pre > θ)``. For θ >= 0 both are ``pre * (pre > θ)``; for θ < 0
both are ``ReLU(pre)``. So a batchtopk cfg.json carries ``"architecture": "jumprelu"`` —
the only key on which saelab's and SAELens' fields collide; :func:`saelab_architecture`
recovers ``"batchtopk"`` from such a cfg.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
"""The only weights file name ``SAE.load_from_disk`` reads."""
SAELAB_WEIGHTS_FILE = "sae.safetensors"
"""saelab's own weights file name; read as a fallback by :func:`read_saelens_folder`."""
SAELENS_ACTIVATION_SCALER_FILE = "activation_scaler.json"
SAELENS_WHITENING_FILE = "activation_whitening.safetensors"
SAELENS_V5_STORE_STATE_FILE = "activations_store_state.safetensors"

SAELENS_LAYOUT_VERSION = "6.54.12"
"""The SAELens release whose cfg.json layout we write and verified against; written as
``metadata.sae_lens_version`` so that SAELens takes its v6 (not the legacy) code path."""

WEIGHT_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
SUPPORTED_SAELENS_ARCHITECTURES: tuple[str, ...] = ("topk", "jumprelu", "standard",
                                                     "batchtopk")

_V5_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
_V5_METADATA_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index",
                     "context_size", "prepend_bos", "dataset_path", "neuronpedia_id",
                     "model_from_pretrained_kwargs", "seqpos_slice",
                     "sae_lens_training_version", "hf_hook_name")
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)$")


# -- writing ----------------------------------------------------------------------------
def saelens_architecture(architecture: str) -> str:
    """SAELens' inference architecture for a saelab architecture (batchtopk -> jumprelu)."""
    if architecture == "topk":
        return "topk"
    if architecture == "batchtopk":
        return "jumprelu"
    raise ValueError(f"unknown saelab architecture {architecture!r}: "
                     "expected 'topk' or 'batchtopk'")


def saelens_cfg_fields(architecture: str, d_in: int, d_sae: int, k: int | None,
                       threshold: float | None, model_name: str, hook_layer: int,
                       hook_name: str, context_size: int, prepend_bos: bool = True
                       ) -> dict[str, Any]:
    """The cfg.json fields SAELens (v6 layout) needs, to merge into saelab's cfg.json.

    ``topk`` -> SAELens ``topk`` with ``k`` and ``rescale_acts_by_decoder_norm: false``.
    ``batchtopk`` -> SAELens ``jumprelu`` (see the module docstring: exact same maths);
    the weights file must then carry a ``threshold`` [d_sae] tensor filled with the
    scalar threshold (:func:`saelens_state_dict` builds it), and ``k`` is kept, as SAELens
    does, in ``metadata.training_architecture_details``.

    Everything is pinned explicitly (no reliance on SAELens defaults): the weights are in
    raw activation space, so ``apply_b_dec_to_input`` is true and ``normalize_activations``
    is ``"none"`` (saelab's ``input_scale`` is already folded in). The SAELens keys
    that saelab also uses (``d_in``, ``d_sae``, ``k``, ``dtype``) mean the same thing;
    ``architecture`` differs for batchtopk, and model/hook information lives under
    ``metadata`` (saelab's top-level ``model_name``/``hook_name`` are ignored by SAELens).
    If saelab's cfg has a ``metadata`` dict of its own, merge the two dicts.
    """
    arch = saelens_architecture(architecture)
    if d_in < 1 or d_sae < 1:
        raise ValueError(f"d_in and d_sae must be positive (got {d_in}, {d_sae})")
    expected_hook = f"blocks.{hook_layer}.hook_resid_post"
    if hook_name != expected_hook:
        raise ValueError(f"hook_name {hook_name!r} does not match hook_layer {hook_layer} "
                         f"(expected {expected_hook!r})")
    details: dict[str, Any] = {}
    fields: dict[str, Any] = {
        "architecture": arch,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if architecture == "topk":
        if k is None or isinstance(k, bool) or int(k) != k or not 1 <= k <= d_sae:
            raise ValueError(f"topk needs an integer k in [1, d_sae] (got {k!r})")
        fields["k"] = int(k)
        fields["rescale_acts_by_decoder_norm"] = False
    else:
        if threshold is None or not math.isfinite(float(threshold)):
            raise ValueError("batchtopk needs its finite scalar inference threshold "
                             f"(got {threshold!r})")
        if k is not None:
            details["k"] = k
    fields["metadata"] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": int(context_size),
        "prepend_bos": bool(prepend_bos),
        "training_architecture": architecture,
        "training_architecture_details": details,
    }
    return fields


def saelens_state_dict(architecture: str, tensors: dict[str, torch.Tensor],
                       threshold: float | None = None) -> dict[str, torch.Tensor]:
    """Exactly the tensors SAELens' strict loader expects in ``sae_weights.safetensors``.

    ``tensors`` holds W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in] (other entries are ignored); for ``batchtopk`` a ``threshold`` [d_sae]
    filled with the scalar ``threshold`` is added.
    """
    arch = saelens_architecture(architecture)
    missing = [name for name in WEIGHT_NAMES if name not in tensors]
    if missing:
        raise ValueError(f"missing SAE tensors: {', '.join(missing)}")
    out = {name: tensors[name].detach().to("cpu", torch.float32).contiguous()
           for name in WEIGHT_NAMES}
    if out["W_enc"].dim() != 2:
        raise ValueError(f"W_enc must be [d_in, d_sae], got {tuple(out['W_enc'].shape)}")
    d_in, d_sae = out["W_enc"].shape
    _check_shapes(out, d_in, d_sae)
    if arch == "jumprelu":
        if threshold is None or not math.isfinite(float(threshold)):
            raise ValueError("batchtopk needs its finite scalar inference threshold")
        out["threshold"] = torch.full((d_sae,), float(threshold), dtype=torch.float32)
    return out


def saelab_architecture(cfg: dict[str, Any]) -> str:
    """saelab's architecture for a cfg.json written with :func:`saelens_cfg_fields`."""
    arch = cfg.get("architecture")
    metadata = cfg.get("metadata") or {}
    if arch == "jumprelu" and metadata.get("training_architecture") == "batchtopk":
        return "batchtopk"
    if arch in ("topk", "batchtopk"):
        return str(arch)
    raise ValueError(f"cfg architecture {arch!r} is not a saelab architecture")


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
    checkpoints). Anything else raises ValueError.
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
        raise ValueError("this looks like an EleutherAI Sparsify checkpoint "
                         "(encoder.weight), not an SAELens one; it is not supported")
    cfg, layout = _normalise_layout(raw_cfg)
    arch = cfg["architecture"]
    if arch not in SUPPORTED_SAELENS_ARCHITECTURES:
        raise ValueError(f"unsupported SAELens architecture {arch!r}: saelab reads "
                         f"{', '.join(SUPPORTED_SAELENS_ARCHITECTURES)}")
    metadata: dict[str, Any] = cfg["metadata"]
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("SAELens cfg needs integer d_in and d_sae") from exc

    if cfg.get("reshape_activations", "none") != "none" or str(
            metadata.get("hook_name") or "").endswith("_z"):
        raise ValueError("hook_z (attention-output) SAEs are not supported: saelab hooks "
                         "the residual stream")
    if metadata.get("hook_head_index") is not None:
        raise ValueError("per-head SAEs (hook_head_index) are not supported")
    hook_layer, hook_name = _resid_post_hook(cfg, metadata)

    t = {name: value.detach().to("cpu", torch.float64) for name, value in state.items()}
    missing = [name for name in WEIGHT_NAMES if name not in t]
    if missing:
        raise ValueError(f"SAE weights lack {', '.join(missing)} (have: {', '.join(t)})")
    W_enc, b_enc, W_dec, b_dec = (t.pop(name) for name in WEIGHT_NAMES)
    _check_shapes({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
                  d_in, d_sae)

    # Threshold (jumprelu: per latent; batchtopk training checkpoint: scalar).
    threshold: torch.Tensor | None = None
    if arch == "jumprelu":
        if "threshold" in t:
            threshold = t.pop("threshold")
        elif "log_threshold" in t:
            threshold = t.pop("log_threshold").exp()
        else:
            raise ValueError("jumprelu SAE weights lack a 'threshold' tensor")
    elif arch == "batchtopk":
        for name in ("topk_threshold", "threshold"):
            if name in t:
                threshold = t.pop(name)
                break
        else:
            if cfg.get("threshold") is None:
                raise ValueError("batchtopk SAE has no threshold (tensor or cfg value)")
            threshold = torch.tensor(float(cfg["threshold"]), dtype=torch.float64)
        threshold = threshold.reshape(-1)
        if threshold.numel() == 1:
            threshold = threshold.expand(d_sae).clone()
    elif arch == "standard":
        if cfg.get("activation_fn", "relu") != "relu":
            raise ValueError(f"unsupported activation {cfg.get('activation_fn')!r} for a "
                             "standard SAE (only relu)")
        threshold = torch.zeros(d_sae, dtype=torch.float64)
    if threshold is not None and threshold.shape != (d_sae,):
        raise ValueError(f"threshold has shape {tuple(threshold.shape)}, expected ({d_sae},)")

    # v5 finetuning scaling: z * s @ W_dec == z @ (s[:, None] * W_dec).
    ft_scale = t.pop("finetuning_scaling_factor", None)
    legacy_scale = t.pop("scaling_factor", None)
    if ft_scale is None and legacy_scale is not None:
        if not torch.all(legacy_scale == 1) and not cfg.get("finetuning_scaling_factor"):
            raise ValueError("a 'scaling_factor' tensor is present but "
                             "finetuning_scaling_factor is false")
        ft_scale = legacy_scale
    if t:
        raise ValueError(f"unexpected tensors for a {arch} SAE: {', '.join(sorted(t))}")

    # 1) decoder-norm rescaling (TopK/BatchTopK): pre' = pre * n, W_dec' = W_dec / n.
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1)
        if not torch.all(norms > 0):
            raise ValueError("cannot fold rescale_acts_by_decoder_norm: a decoder row is zero")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if ft_scale is not None:
        if ft_scale.shape != (d_sae,):
            raise ValueError(f"finetuning scaling factor has shape {tuple(ft_scale.shape)}")
        W_dec = W_dec * ft_scale[:, None]
    # 2) no b_dec subtraction: x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc).
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    # 3) input normalisation (outermost transform first).
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
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
            W_enc = matrix @ W_enc
            W_dec = W_dec @ inverse
            b_dec = b_dec @ inverse + mean
        if norm == "expected_average_only_in" or scale is not None:
            if scale is None:
                raise ValueError(
                    "normalize_activations='expected_average_only_in' but the folder holds "
                    f"no scaling factor ({SAELENS_ACTIVATION_SCALER_FILE} or "
                    f"{SAELENS_V5_STORE_STATE_FILE}); SAELens keeps the factors of hub "
                    "releases in pretrained_saes.yaml: load it with SAE.from_pretrained "
                    "(which folds it) and save it again")
            W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale

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

    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if out_arch == "jumprelu":
        assert threshold is not None
        tensors["threshold"] = threshold
    tensors = {name: value.to(torch.float32).contiguous() for name, value in tensors.items()}

    out: dict[str, Any] = {
        "architecture": out_arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "threshold": scalar_threshold,
        "model_name": metadata.get("model_name"),
        "hook_layer": hook_layer,
        "hook_name": hook_name,
        "dtype": "float32",
        "saelens_layout": layout,
        "saelens_architecture": cfg["architecture"],
        "saelens_version": metadata.get("sae_lens_version"),
    }
    for key in ("context_size", "prepend_bos"):
        if metadata.get(key) is not None:
            out[key] = metadata[key]
    if metadata.get("hook_name") and metadata["hook_name"] != hook_name:
        out["saelens_hook_name"] = metadata["hook_name"]
    return out, tensors


# -- helpers ----------------------------------------------------------------------------
def _check_shapes(t: dict[str, torch.Tensor], d_in: int, d_sae: int) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t[name].shape)}, expected {shape} "
                             f"(d_in={d_in}, d_sae={d_sae})")


def _major(version: Any) -> int | None:
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def _normalise_layout(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A v6-shaped copy of an SAELens cfg (top-level SAE fields + ``metadata`` dict)."""
    nested = raw.get("metadata")
    nested = dict(nested) if isinstance(nested, dict) else {}
    version = raw.get("sae_lens_version") or nested.get("sae_lens_version")
    major = _major(version)
    if major is not None and major >= 6:
        cfg = dict(raw)
        cfg["metadata"] = nested
        for key in ("model_name", "hook_name"):  # saelab's own top-level copies
            if nested.get(key) is None and raw.get(key) is not None:
                nested[key] = raw[key]
        cfg.setdefault("normalize_activations", "none")
        return cfg, "v6"

    # v5 (and older) layout, as SAELens' handle_pre_6_0_config reads it.
    cfg = {_V5_RENAMES.get(key, key): value for key, value in raw.items()}
    cfg.setdefault("architecture", "standard")
    activation = cfg.get("activation_fn") or "relu"
    cfg["activation_fn"] = activation
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk":
        if cfg["architecture"] not in ("standard", "topk"):
            raise ValueError(f"topk activation on a {cfg['architecture']!r} SAE is not "
                             "supported")
        if kwargs.get("k") is None:
            raise ValueError("v5 topk cfg lacks activation_fn_kwargs.k")
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    elif activation != "relu":
        raise ValueError(f"unsupported activation function {activation!r} "
                         "(saelab reads relu, jumprelu and topk SAEs)")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    cfg["normalize_activations"] = norm or "none"
    metadata = {key: cfg[key] for key in _V5_METADATA_KEYS if key in cfg}
    metadata.update(nested)
    metadata.setdefault("sae_lens_version", version)
    cfg["metadata"] = metadata
    return cfg, "v5"


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
