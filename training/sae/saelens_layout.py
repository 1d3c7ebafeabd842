"""SAELens' two cfg.json layouts, as one: v6 (top-level SAE fields and a ``metadata`` dict)
and the v5 one ``handle_pre_6_0_config`` reads (flat keys, ``activation_fn_str`` /
``activation_fn_kwargs``, model and hook information at the top level)."""

from __future__ import annotations

import re
from typing import Any

_V5_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
_V5_METADATA_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index",
                     "context_size", "prepend_bos", "dataset_path", "neuronpedia_id",
                     "model_from_pretrained_kwargs", "seqpos_slice",
                     "sae_lens_training_version", "hf_hook_name")

def major_version(version: Any) -> int | None:
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def normalise_layout(raw: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A v6-shaped copy of an SAELens cfg (top-level SAE fields + ``metadata`` dict)."""
    nested = raw.get("metadata")
    nested = dict(nested) if isinstance(nested, dict) else {}
    version = raw.get("sae_lens_version") or nested.get("sae_lens_version")
    major = major_version(version)
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
