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

Transcoders (saelab's ``site: "mlp"``, trained as BatchTopK) are saved as SAELens'
``jumprelu_transcoder`` (``jumprelu_skip_transcoder`` with ``W_skip`` [d_out, d_in]) with
the shared threshold per latent: SAELens' transcoders never subtract b_dec from the input
(``apply_b_dec_to_input`` must be false), decode with ``z @ W_dec + b_dec`` (+ ``x @
W_skip.T``), and read ``hook_name`` into ``hook_name_out`` (``blocks.L.hook_mlp_out``),
which is saelab's maths exactly. ``hook_name`` is ``blocks.L.mlp.hook_in``, the MLP's own
input, which SAELens' ``HookedSAETransformer`` adds to every MLP (as circuit-tracer names
it), with ``model_from_pretrained_kwargs: {"fold_ln": false}`` so the norm's gain stays in
the norm: TransformerLens' ``ln2.hook_normalized`` is taken before that gain, so it is not
what saelab's transcoders read (nor is the MLP's input with ``fold_ln``, which moves the
gain into the MLP). A TopK transcoder has no SAELens form, so saelab trains transcoders as
BatchTopK.

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

import math
from typing import Any

import torch

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
"""The only weights file name ``SAE.load_from_disk`` reads."""
SAELAB_WEIGHTS_FILE = "sae.safetensors"
"""saelab's own weights file name; read as a fallback by
:func:`training.sae.saelens_read.read_saelens_folder`."""
SAELENS_ACTIVATION_SCALER_FILE = "activation_scaler.json"
SAELENS_WHITENING_FILE = "activation_whitening.safetensors"
SAELENS_V5_STORE_STATE_FILE = "activations_store_state.safetensors"

SAELENS_LAYOUT_VERSION = "6.54.12"
"""The SAELens release whose cfg.json layout we write and verified against; written as
``metadata.sae_lens_version`` so that SAELens takes its v6 (not the legacy) code path."""

WEIGHT_NAMES: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
SUPPORTED_SAELENS_ARCHITECTURES: tuple[str, ...] = ("topk", "jumprelu", "standard",
                                                     "batchtopk", "gated")


TRANSCODER_ARCHITECTURES = {"jumprelu_transcoder": False, "jumprelu_skip_transcoder": True}
"""SAELens' transcoder architectures saelab writes and reads -> has a skip path."""


# -- writing ----------------------------------------------------------------------------
def site_hooks(site: str, layer: int) -> dict[str, str]:
    """TransformerLens hook names of what an SAE at ``site`` of block ``layer`` reads
    (``hook_name``) and, for a transcoder, writes (``hook_name_out``)."""
    if site == "mlp":
        return {"hook_name": f"blocks.{layer}.mlp.hook_in",
                "hook_name_out": f"blocks.{layer}.hook_mlp_out"}
    return {"hook_name": f"blocks.{layer}.hook_resid_post"}


def saelens_architecture(architecture: str, site: str = "resid", skip: bool = False) -> str:
    """SAELens' inference architecture for a saelab architecture (batchtopk -> jumprelu;
    a transcoder -> jumprelu_transcoder or jumprelu_skip_transcoder)."""
    if site == "mlp":
        if architecture != "batchtopk":
            raise ValueError(f"--arch {architecture}: transcoders train as batchtopk (SAELens "
                             "loads them as JumpReLU transcoders, which BatchTopK is exactly "
                             "at inference; TopK has no SAELens transcoder)")
        return "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
    if architecture == "topk":
        return "topk"
    if architecture == "batchtopk":
        return "jumprelu"
    raise ValueError(f"unknown saelab architecture {architecture!r}: "
                     "expected 'topk' or 'batchtopk'")


def saelens_cfg_fields(architecture: str, d_in: int, d_sae: int, k: int | None,
                       threshold: float | None, model_name: str, hook_layer: int,
                       hook_name: str, context_size: int, prepend_bos: bool = True,
                       site: str = "resid", skip: bool = False) -> dict[str, Any]:
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
    arch = saelens_architecture(architecture, site, skip)
    if d_in < 1 or d_sae < 1:
        raise ValueError(f"d_in and d_sae must be positive (got {d_in}, {d_sae})")
    hooks = site_hooks(site, hook_layer)
    expected_hook = hooks["hook_name"]
    if hook_name != expected_hook:
        raise ValueError(f"hook_name {hook_name!r} does not match hook_layer {hook_layer} "
                         f"(expected {expected_hook!r})")
    fields: dict[str, Any] = {
        "architecture": arch,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": site != "mlp",
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if site == "mlp":
        fields["d_out"] = int(d_in)
    details = _architecture_fields(fields, architecture, k, d_sae, threshold)
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
        **({"hook_name_out": hooks["hook_name_out"],
            "model_from_pretrained_kwargs": {"fold_ln": False}} if site == "mlp" else {}),
    }
    return fields


def _architecture_fields(fields: dict[str, Any], architecture: str, k: int | None, d_sae: int,
                         threshold: float | None) -> dict[str, Any]:
    """Add topk's ``k`` to ``fields``, or check batchtopk's threshold; returns the
    ``training_architecture_details`` (batchtopk's k)."""
    if architecture == "topk":
        if k is None or isinstance(k, bool) or int(k) != k or not 1 <= k <= d_sae:
            raise ValueError(f"topk needs an integer k in [1, d_sae] (got {k!r})")
        fields["k"] = int(k)
        fields["rescale_acts_by_decoder_norm"] = False
        return {}
    if threshold is None or not math.isfinite(float(threshold)):
        raise ValueError("batchtopk needs its finite scalar inference threshold "
                         f"(got {threshold!r})")
    return {} if k is None else {"k": k}


def saelens_state_dict(architecture: str, tensors: dict[str, torch.Tensor],
                       threshold: float | None = None, site: str = "resid",
                       skip: bool = False) -> dict[str, torch.Tensor]:
    """Exactly the tensors SAELens' strict loader expects in ``sae_weights.safetensors``.

    ``tensors`` holds W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
    b_dec [d_in] (other entries are ignored); for ``batchtopk`` a ``threshold`` [d_sae]
    filled with the scalar ``threshold`` is added, and a skip-transcoder's ``W_skip``.
    """
    arch = saelens_architecture(architecture, site, skip)
    missing = [name for name in WEIGHT_NAMES if name not in tensors]
    if missing:
        raise ValueError(f"missing SAE tensors: {', '.join(missing)}")
    out = {name: tensors[name].detach().to("cpu", torch.float32).contiguous()
           for name in WEIGHT_NAMES}
    if out["W_enc"].dim() != 2:
        raise ValueError(f"W_enc must be [d_in, d_sae], got {tuple(out['W_enc'].shape)}")
    d_in, d_sae = out["W_enc"].shape
    check_shapes(out, d_in, d_sae)
    if arch != "topk":
        if threshold is None or not math.isfinite(float(threshold)):
            raise ValueError("batchtopk needs its finite scalar inference threshold")
        out["threshold"] = torch.full((d_sae,), float(threshold), dtype=torch.float32)
    if skip:
        out["W_skip"] = tensors["W_skip"].detach().to("cpu", torch.float32).contiguous()
    return out


def pop_jumprelu_threshold(rest: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """A JumpReLU state dict's per-latent threshold, popped from ``rest``: ``threshold``,
    or ``log_threshold`` exponentiated (``kind`` names the weights in the error)."""
    if "threshold" in rest:
        return rest.pop("threshold")
    if "log_threshold" in rest:
        return rest.pop("log_threshold").exp()
    raise ValueError(f"jumprelu {kind} weights lack a 'threshold' tensor")


def saelab_architecture(cfg: dict[str, Any]) -> str:
    """saelab's architecture for a cfg.json written with :func:`saelens_cfg_fields`."""
    arch = cfg.get("architecture")
    metadata = cfg.get("metadata") or {}
    if (arch == "jumprelu" or arch in TRANSCODER_ARCHITECTURES) and metadata.get(
            "training_architecture") in ("batchtopk", "matryoshka_batchtopk"):
        return "batchtopk"
    if arch in ("topk", "batchtopk"):
        return str(arch)
    raise ValueError(f"cfg architecture {arch!r} is not a saelab architecture")


def check_shapes(t: dict[str, torch.Tensor], d_in: int, d_sae: int) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t[name].shape)}, expected {shape} "
                             f"(d_in={d_in}, d_sae={d_sae})")
