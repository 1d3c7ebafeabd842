"""What a job runs on: one validated record per job (its row keeps it as JSON), with an
upper bound on every size a request can set, and the checks that can be made at
submission instead of failing later in a worker (paths inside the allowed roots, captures
and SAEs that exist, a layer the model has, no hub downloads from the web)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.paths import PathRefused, checked_path, checked_source
from app.settings import Settings

PATH = 4096
"""Longest path or name a parameter may hold."""
EMBEDDED_LAYERS = 30
"""Decoder blocks of the embedded model (SmolLM2-135M)."""
SAE_MARKERS = ("cfg.json", "ae.pt")
"""One of these is in every SAE folder load_sae reads (dictionary_learning's: ae.pt)."""


class JobParams(BaseModel):
    """What a job runs on; defaults finish in minutes on the embedded model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, max_length=PATH, description="model [default: settings]")
    layer: int | None = Field(None, ge=0, le=1024, description="decoder block")
    dataset: str = Field("embedded", max_length=PATH)
    tokens: int = Field(65_536, ge=1, le=10**10, description="activations to capture")
    context: int = Field(128, ge=2, le=32_768)
    site: Literal["resid", "mlp"] = Field("resid", description="resid: an SAE of the block's "
                                          "output; mlp: a transcoder from the block's MLP "
                                          "input to its output")
    latents: int = Field(2048, ge=2, le=1 << 21, description="SAE latents n")
    k: int = Field(32, ge=1, le=4096)
    arch: Literal["topk", "batchtopk"] | None = Field(
        None, description="topk or batchtopk [default: topk; batchtopk for a transcoder]")
    matryoshka: list[int] | None = Field(None, max_length=16, description="Matryoshka "
                                         "SAE: nested prefix widths, each reconstructing "
                                         "the input (e.g. [1024, 4096])")
    skip: bool = Field(False, description="a transcoder's linear skip path (skip-transcoder)")
    sweep_latents: list[Annotated[int, Field(ge=2, le=1 << 21)]] | None = Field(
        None, min_length=1, max_length=8, description="sweep: the dictionary sizes, e.g. "
        "4096,16384 (every combination with sweep_k and sweep_arch is trained)")
    sweep_k: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=1, max_length=8, description="sweep: the k values, e.g. 16,32")
    sweep_arch: list[Literal["topk", "batchtopk"]] | None = Field(
        None, min_length=1, max_length=2, description="sweep: architectures [default: arch]")
    nproc: int = Field(1, ge=1, le=64, description="data-parallel training processes")
    batch: int = Field(4096, ge=1, le=1 << 20)
    lr: float | None = Field(None, gt=0, lt=1)
    train_tokens: int | None = Field(None, ge=1, le=10**11, description="[default: one pass]")
    checkpoint_every: int = Field(50, ge=0, le=10**7)
    analyze_tokens: int = Field(65_536, ge=1, le=10**10)
    feature_map: bool = Field(True, description="analyze: lay the latents out in 2-D "
                              "(UMAP of the decoder directions) for the feature map")
    eval_tokens: int = Field(4096, ge=0, le=10**8, description="held-out tokens to evaluate "
                             "the SAE spliced into the model on (0: skip)")
    acts: str | None = Field(None, max_length=PATH, description="capture directory (train, "
                             "analyze)")
    sae: str | None = Field(None, max_length=PATH, description="SAE directory (analyze)")
    sae_id: int | None = Field(None, ge=1, le=2**62, description="SAE in the store (explain, "
                               "steer_eval)")
    latent_range: str | None = Field(None, max_length=10_000, pattern=(
        r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$"),
        description="latents to explain, e.g. '0-99' or '3,7,10-20' [default: all]")
    explain_count: int = Field(0, ge=0, le=100_000, description="pipeline: besides the "
                               "maxact label of every live latent, LLM labels for this many "
                               "latents sampled across densities")
    explainer: Literal["auto", "maxact", "claude", "openai", "local"] = Field(
        "auto", description="auto: Claude with an API key, else an OpenAI-compatible server "
        "when one is configured, else the local model; maxact: offline labels")
    explainer_model: str | None = Field(None, max_length=300, description="the LLM "
                                        "explainer's model [default: settings; for local, "
                                        "the SAE's model]")
    score: bool = Field(True, description="score explanations (detection, fuzzing)")
    steer_eval_count: int = Field(0, ge=0, le=4096, description="pipeline: measure the "
                                  "steerability of this many of the most active non-sink "
                                  "latents")
    strengths: str = Field("1,2,4,8", max_length=200, pattern=(
        r"^\s*-?\d+(\.\d+)?(\s*,\s*-?\d+(\.\d+)?){0,15}\s*$"),
        description="steer_eval: up to 16 clamp strengths in units of each latent's max")
    prompts: list[str] | None = Field(None, max_length=64, description="steer_eval: neutral "
                                      "prompts [default: eight built-in ones]")
    queue: str | None = Field(None, max_length=64, pattern=r"^[\w.@-]+$")

    @field_validator("sweep_latents", "sweep_k", "sweep_arch", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        """A form's "4096,16384" as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def arch_for(self, site: str) -> str:
        """The architecture to train at ``site``: the one asked for, else topk (batchtopk
        for a transcoder: TopK has no SAELens transcoder form)."""
        return self.arch or ("batchtopk" if site == "mlp" else "topk")


_CAPTURE = ("model", "layer", "dataset", "tokens", "context", "site")
_TRAIN = ("latents", "k", "arch", "skip", "matryoshka", "nproc", "batch", "lr",
          "train_tokens", "checkpoint_every")
FIELDS_OF: dict[str, tuple[str, ...]] = {
    "capture": _CAPTURE,
    "train": ("acts", *_TRAIN),
    "analyze": ("sae", "acts", "model", "layer", "dataset", "analyze_tokens", "eval_tokens",
                "feature_map"),
    "explain": ("sae_id", "latent_range", "explainer", "explainer_model", "score"),
    "steer_eval": ("sae_id", "latent_range", "strengths", "prompts"),
    "sweep": ("acts", *(f for f in _CAPTURE if f != "site"), "sweep_latents", "sweep_k",
              "sweep_arch", "matryoshka", "batch", "lr", "train_tokens", "checkpoint_every",
              "analyze_tokens", "eval_tokens", "feature_map"),
    "pipeline": (*_CAPTURE, *_TRAIN, "analyze_tokens", "eval_tokens", "feature_map",
                 "explain_count",
                 "explainer", "explainer_model", "steer_eval_count"),
}
"""The parameters each kind of job reads (what its form shows and its page lists)."""


def submission_problems(kind: str, parsed: JobParams, settings: Settings, *, web: bool
                        ) -> dict[str, str]:
    """What can be known wrong at submission, by field; resolves the paths in ``parsed``
    (web requests: inside the allowed roots only, hub ids only with hub access)."""
    problems: dict[str, str] = {}
    for name in ("model", "dataset"):
        value = getattr(parsed, name)
        if value is not None and web:
            try:
                setattr(parsed, name, checked_source(name, value, settings,
                                                     hub=settings.hub_access))
            except PathRefused as exc:
                problems[name] = exc.problem
    if parsed.explainer == "local" and parsed.explainer_model and web:
        try:  # the local explainer loads this model: a source like any other
            parsed.explainer_model = checked_source("explainer_model", parsed.explainer_model,
                                                    settings, hub=settings.hub_access)
        except PathRefused as exc:
            problems["explainer_model"] = exc.problem
    for name, markers, what in (("acts", ("manifest.json",), "a capture"),
                                ("sae", SAE_MARKERS, "an SAE folder")):
        value = getattr(parsed, name)
        if value is None:
            continue
        try:
            path = checked_path(name, value, settings) if web else Path(value).expanduser()
        except PathRefused as exc:
            problems[name] = exc.problem
            continue
        if not any((path / marker).is_file() for marker in markers):
            problems[name] = f"{value} is not {what} (no {' or '.join(markers)} there)"
        setattr(parsed, name, str(path))
    problems.update(site_problems(kind, parsed))
    if any(len(p) > 2000 or not p.strip() for p in parsed.prompts or []):
        problems["prompts"] = "each prompt must hold text, at most 2,000 characters"
    if parsed.layer is not None and "model" not in problems:
        blocks = model_layers(parsed.model or settings.default_model, settings)
        if blocks is not None and parsed.layer >= blocks:
            problems["layer"] = f"{parsed.layer} is out of range: the model has {blocks} " \
                                f"decoder blocks (0 to {blocks - 1})"
    return problems


def site_problems(kind: str, parsed: JobParams) -> dict[str, str]:
    """Transcoder settings that cannot work: TopK at the MLP site, a skip path without it,
    a sweep of transcoders. The site is the job's (pipeline, sweep) or its capture's
    (train, sweep on a capture)."""
    site = parsed.site
    if kind in ("train", "sweep") and parsed.acts is not None:
        manifest = Path(parsed.acts) / "manifest.json"
        if manifest.is_file():
            with contextlib.suppress(OSError, ValueError):  # (the path check reports it)
                site = "mlp" if json.loads(manifest.read_text()).get(
                    "hook_point") == "mlp" else "resid"
    problems: dict[str, str] = {}
    if kind == "sweep" and site == "mlp":
        problems["site"] = "a sweep trains residual-stream SAEs: train a transcoder on its own"
    elif site == "mlp" and parsed.arch == "topk" and kind in ("pipeline", "train"):
        problems["arch"] = "a transcoder trains as batchtopk (SAELens loads it as a JumpReLU " \
                           "transcoder, which BatchTopK is exactly)"
    if parsed.skip and site != "mlp" and kind in ("pipeline", "train", "sweep"):
        problems["skip"] = "a skip path is for transcoders: capture at the mlp site"
    return problems


def model_layers(model: str, settings: Settings) -> int | None:
    """Decoder blocks of a model known without loading it: the embedded one, or a local
    checkpoint's config.json; None for a hub id."""
    if model == "smollm2-135m":
        return EMBEDDED_LAYERS
    config = Path(model).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    blocks = data.get("num_hidden_layers") or (data.get("text_config") or {}).get(
        "num_hidden_layers")
    return int(blocks) if isinstance(blocks, int) else None
