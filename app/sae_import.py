"""Bringing an SAE trained elsewhere into the lab: read its folder now, then queue the
``analyze`` job that captures a dataset at its layer and analyses every latent.

``saelab import-sae`` and the explorer's Add-an-SAE page both call ``import_params``, so
the two cannot disagree on what a folder must say or on the job it becomes. Allow-listing
the path is the caller's part (the web confines it to the allowed roots before anything
reads it; the operator's command line may name any folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.paths import EMBEDDED_NAMES

if TYPE_CHECKING:  # the training code loads only when a folder is read
    from training.sae.autoencoder import SaeConfig

EMBEDDED_WIDTH = 576
"""Hidden size of the embedded model (SmolLM2-135M)."""
DEFAULT_DATASET = "embedded"
DEFAULT_TOKENS = 131_072
"""Tokens an imported SAE is analysed on unless told otherwise."""


class SaeFolderError(ValueError):
    """A folder that cannot be imported as it is; ``field`` is the input that would fix it
    (``sae``: the folder itself, ``model``, ``layer``), ``problem`` says what is wrong and
    ``missing`` whether the folder merely does not say (then giving the field fixes it)."""

    def __init__(self, field: str, problem: str, *, missing: bool = False) -> None:
        super().__init__(problem)
        self.field, self.problem, self.missing = field, problem, missing


@dataclass(frozen=True)
class FolderSae:
    """What an SAE folder holds, read by ``load_sae`` (every format it knows)."""

    path: Path
    source_format: str
    """saelab, saelens, sparsify or dictionary_learning."""
    architecture: str
    d_in: int
    latents: int
    model: str | None
    layer: int | None
    """The block it reads (its output, the residual stream; a transcoder its MLP's input),
    when the folder says."""
    kind: str = "SAE"
    """SAE, transcoder or skip-transcoder."""

    def describe(self) -> str:
        """One line: 'a dictionary_learning batchtopk SAE: d_in 64, 256 latents, ...'."""
        model = f"model {self.model}" if self.model else "no model named"
        layer = f"layer {self.layer}" if self.layer is not None else "no layer named"
        return (f"a {self.source_format} {self.architecture} {self.kind}: d_in {self.d_in}, "
                f"{self.latents:,} latents, {model}, {layer}")


def read_folder(folder: Path) -> FolderSae:
    """Load the SAE in ``folder`` (a ``SaeFolderError`` on ``sae`` if it cannot be read)."""
    from training.sae.folder import SaeLoadError, load_sae

    try:
        sae, cfg = load_sae(folder)
    except SaeLoadError as exc:
        raise SaeFolderError("sae", str(exc)) from None
    source = cfg.get("source_format") or ("saelens" if "saelens_layout" in cfg else "saelab")
    layer = cfg.get("hook_layer")
    return FolderSae(path=Path(folder).resolve(), source_format=source,
                     architecture=sae.cfg.architecture, d_in=sae.cfg.d_in,
                     latents=sae.cfg.n_latents, model=cfg.get("model_name") or None,
                     layer=None if layer is None else int(layer), kind=_kind(sae.cfg))


def _kind(cfg: SaeConfig) -> str:
    if not cfg.transcoder:
        return "SAE"
    return "skip-transcoder" if cfg.skip else "transcoder"


def import_params(folder: Path, *, model: str | None, layer: int | None, dataset: str,
                  tokens: int, vet_model: Callable[[str], str] = str
                  ) -> tuple[dict[str, Any], FolderSae]:
    """The ``analyze`` job's params for the SAE in ``folder`` and what the folder holds.

    ``model`` overrides the folder's; ``layer`` is needed only when the folder does not
    name one (and must agree when it does). ``vet_model`` allow-lists the model before its
    config is read for its width (the web's path check). Raises ``SaeFolderError``."""
    found = read_folder(folder)
    model = model or found.model
    if not model:
        raise SaeFolderError("model", f"{folder} does not name the model it was trained on",
                             missing=True)
    model = vet_model(model)
    width = model_width(model)
    if width is not None and width != found.d_in:
        raise SaeFolderError("model", f"{folder} has d_in {found.d_in} but {model} has width "
                                      f"{width}: the SAE was not trained on this model")
    if layer is None and found.layer is None:
        raise SaeFolderError("layer", f"{folder} does not say which layer it reads",
                             missing=True)
    if layer is not None and found.layer is not None and layer != found.layer:
        reads = "the output of" if found.kind == "SAE" else "the MLP of"
        raise SaeFolderError("layer", f"{folder} reads {reads} block {found.layer}, "
                                      f"not {layer}")
    params = {"sae": str(found.path), "model": model, "dataset": dataset,
              "analyze_tokens": tokens, "layer": found.layer if layer is None else layer}
    return params, found  # the layer too: submission checks that the model has it


def model_width(model: str) -> int | None:
    """The residual-stream width of a model known without loading it: the embedded one's,
    or a local checkpoint's ``config.json`` ``hidden_size``; None for a hub id."""
    if model in EMBEDDED_NAMES:
        return EMBEDDED_WIDTH
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    width = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return width if isinstance(width, int) else None
