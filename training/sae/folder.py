"""Saving and loading SAEs as a folder: ``cfg.json`` + ``sae.safetensors``.

On disk the SAE works on *raw* activations: the dataset-level input scale s used in
training is folded into the weights (W_enc·s, W_dec/s, b_dec/s), which leaves every latent
activation z unchanged. So any tool (SAELens included) can apply the SAE to the residual
stream directly, and steering by ``(v − z_f)·W_dec[f]`` is in raw units. The decoder rows
then have norm 1/s; ``cfg.json`` records s as ``input_scale``.

Tensor names and shapes follow SAELens: W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d].
The folder also holds ``sae_weights.safetensors``, the one file SAELens'
``SAE.load_from_disk`` reads (a hard link to ``sae.safetensors`` for TopK; for BatchTopK it
adds the per-latent ``threshold`` SAELens' ``jumprelu`` needs).

``load_sae`` also reads the folders other libraries write, converted exactly into the
same form: SAELens (``training.sae.saelens_read``), EleutherAI sparsify
(``training.sae.sparsify_read``) and dictionary_learning's ``ae.pt`` + ``config.json``
(``training.sae.dictlearn_read``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.sae.autoencoder import SaeConfig, SparseAutoencoder
from training.sae.dictlearn_read import CONFIG as DICTLEARN_CONFIG
from training.sae.dictlearn_read import WEIGHTS as DICTLEARN_WEIGHTS
from training.sae.dictlearn_read import is_dictlearn, read_dictlearn_folder
from training.sae.saelens import (
    SAELENS_WEIGHTS_FILE,
    saelab_architecture,
    saelens_cfg_fields,
    saelens_state_dict,
    site_hooks,
)
from training.sae.saelens_read import read_saelens_folder
from training.sae.sparsify_read import convert_sparsify_sae, is_sparsify

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class SaeLoadError(ValueError):
    """A path that does not hold a loadable SAE (message names the path)."""


def folded_state(sae: SparseAutoencoder, input_scale: float, target_scale: float | None = None
                 ) -> dict[str, torch.Tensor]:
    """SAELens-layout tensors of ``sae`` with the scales folded in (raw units): the input's
    s, and a transcoder's output scale t (W_enc·s, W_dec/t, b_dec/t, W_skip·s/t)."""
    s = float(input_scale)
    t = s if target_scale is None or not sae.cfg.transcoder else float(target_scale)
    tensors = {
        "W_enc": (sae.w_enc.detach() * s).t().contiguous().float().cpu(),
        "b_enc": sae.b_enc.detach().float().cpu().clone(),
        "W_dec": (sae.w_dec.detach() / t).contiguous().float().cpu(),
        "b_dec": (sae.b_dec.detach() / t).float().cpu().clone(),
    }
    if sae.cfg.skip:
        tensors["W_skip"] = (sae.w_skip.detach() * (s / t)).contiguous().float().cpu()
    return tensors


def save_sae(directory: Path, sae: SparseAutoencoder, input_scale: float, *,
             model: str, layer: int, context: int, extra: dict | None = None,
             target_scale: float | None = None) -> None:
    """Write ``directory`` (replaced atomically if it exists)."""
    directory = Path(directory)
    site, skip = sae.cfg.site, sae.cfg.skip
    cfg = {**sae.cfg.to_dict(), "d_sae": sae.cfg.n_latents, "input_scale": float(input_scale),
           "threshold": float(sae.threshold), "model_name": model, "hook_layer": layer,
           **site_hooks(site, layer), "context_size": context}
    if sae.cfg.transcoder:
        cfg["target_scale"] = float(target_scale or input_scale)
    cfg.update(saelens_cfg_fields(
        architecture=sae.cfg.architecture, d_in=sae.cfg.d_in, d_sae=sae.cfg.n_latents,
        k=sae.cfg.k, threshold=float(sae.threshold), model_name=model, hook_layer=layer,
        hook_name=cfg["hook_name"], context_size=context, site=site, skip=skip))
    if sae.cfg.matryoshka_widths:  # SAELens' name for the training architecture
        metadata = cfg["metadata"]
        metadata["training_architecture"] = f"matryoshka_{sae.cfg.architecture}"
        metadata["training_architecture_details"] = {
            **(metadata.get("training_architecture_details") or {}),
            "matryoshka_widths": [*sae.cfg.matryoshka_widths, sae.cfg.n_latents]}
    cfg.update(extra or {})
    tensors = folded_state(sae, input_scale, target_scale)
    saelens = saelens_state_dict(sae.cfg.architecture, tensors, float(sae.threshold), site,
                                 skip)
    write_folder(directory, cfg, tensors, saelens)


def write_folder(directory: Path, cfg: dict, tensors: dict[str, torch.Tensor],
                 saelens_tensors: dict[str, torch.Tensor]) -> None:
    """Write cfg.json and both weight files into a temp dir, then move it to ``directory``."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if saelens_tensors.keys() == tensors.keys():
            os.link(tmp / WEIGHTS_FILE, tmp / SAELENS_WEIGHTS_FILE)
        else:
            save_file(saelens_tensors, str(tmp / SAELENS_WEIGHTS_FILE))
        replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` in place of ``target`` so that a crash never leaves neither:
    swapped atomically (Linux ``renameat2(RENAME_EXCHANGE)``), or else the old one renamed
    aside first (``.<name>.old``, restored by the next ``replace_dir``), then ``new``
    renamed in; the old one is deleted last."""
    new, target = Path(new), Path(target)
    aside = target.parent / f".{target.name}.old"
    if aside.exists() and not target.exists():  # a crash between the two renames
        os.replace(aside, target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # it holds the old folder now
        return
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step where the system can (Linux 3.15+); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def load_sae(directory: Path, device: torch.device | str = "cpu"
             ) -> tuple[SparseAutoencoder, dict]:
    """Load a saelab, SAELens, sparsify or dictionary_learning folder as an SAE working on
    raw activations, plus its cfg."""
    directory = Path(directory)
    foreign = not (directory / CFG_FILE).is_file()
    if foreign and not is_dictlearn(directory):
        raise SaeLoadError(f"{directory} is not an SAE folder (no {CFG_FILE}, nor "
                           f"dictionary_learning's {DICTLEARN_WEIGHTS} and {DICTLEARN_CONFIG})")
    try:
        cfg, tensors = (read_dictlearn_folder(directory) if foreign
                        else _read_cfg_folder(directory))
        if cfg.get("architecture") == "jumprelu":
            _shared_threshold_as_batchtopk(cfg, tensors)
        if cfg.get("architecture") not in ("topk", "batchtopk", "jumprelu"):
            raise SaeLoadError(f"{directory} holds a {cfg.get('architecture')} SAE; saelab "
                               "runs TopK, BatchTopK and JumpReLU SAEs")
        sae = _from_tensors(cfg, tensors, directory)
    except SaeLoadError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError,
            OSError) as exc:  # a malformed file says so; it never escapes as a crash
        raise SaeLoadError(f"cannot read the SAE in {directory}: "
                           f"{type(exc).__name__}: {exc}") from exc
    return sae.to(device).eval(), cfg


def _read_cfg_folder(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg, tensors) of a folder with a cfg.json: saelab's own, sparsify's or SAELens'."""
    cfg = json.loads((directory / CFG_FILE).read_text())
    own = (directory / WEIGHTS_FILE).is_file()
    tensors = load_file(str(directory / WEIGHTS_FILE)) if own else {}
    if "n_latents" in cfg and own:
        cfg["architecture"] = saelab_architecture(cfg)
        return cfg, tensors
    if is_sparsify(tensors):
        return convert_sparsify_sae(cfg, tensors, directory)
    return read_saelens_folder(directory)


def _shared_threshold_as_batchtopk(cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """A JumpReLU (or ReLU: threshold 0) SAE whose latents share one threshold θ computes
    ReLU(pre)·[pre > θ], which is exactly BatchTopK's inference rule: load it as that."""
    threshold = tensors.pop("threshold")
    if bool(torch.all(threshold == threshold[0])):
        cfg["architecture"], cfg["threshold"] = "batchtopk", float(threshold[0])
    else:
        tensors["threshold"] = threshold


def _from_tensors(cfg: dict, tensors: dict[str, torch.Tensor], where: Path) -> SparseAutoencoder:
    d_in, n = tensors["W_enc"].shape
    sae_cfg = SaeConfig(d_in=d_in, n_latents=n, k=int(cfg.get("k") or 1),
                        architecture=cfg["architecture"], site=cfg.get("site", "resid"),
                        skip=bool(cfg.get("skip", False)))
    sae = SparseAutoencoder(sae_cfg)
    threshold = (tensors["threshold"] if cfg["architecture"] == "jumprelu"
                 else torch.tensor(float(cfg.get("threshold") or 0.0)))
    state = {"w_enc": tensors["W_enc"].t(), "b_enc": tensors["b_enc"],
             "w_dec": tensors["W_dec"], "b_dec": tensors["b_dec"], "threshold": threshold}
    if sae_cfg.skip:
        state["w_skip"] = tensors["W_skip"]
    try:
        sae.load_state_dict({key: value.float().contiguous() for key, value in state.items()})
    except RuntimeError as exc:
        raise SaeLoadError(f"weights in {where} do not match its cfg.json: {exc}") from exc
    return sae
