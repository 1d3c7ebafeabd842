"""Steering a model with SAE latents at block L, and chat replies with and without it.

Maths (h [B, T, d] the output of block L on every position, W_dec[f] latent f's decoder row,
max_f its max activation from the analysis, v a steer's value)::

    clamp:  h' = h + (v·max_f − z_f(h))·W_dec[f]      z_f(h): the SAE's sparse code of h
    add:    h' = h + (v·max_f)·W_dec[f]
    cap:    h' = h − max(0, h·u_f − v·max_f·‖W_dec[f]‖)·u_f      u_f = W_dec[f]/‖W_dec[f]‖
            (the component of h along the latent's direction limited to what the latent
            at v × its max contributes; h is left alone below that)

A clamp adds a delta rather than replacing h by the reconstruction x̂, so the SAE's error
term h − x̂ stays in the residual stream: with v·max_f = z_f the model runs unchanged.
Several steers sum their deltas, all computed from the same (unedited) code of h.

A transcoder's steers edit block L's MLP output instead: z_f is the code of the MLP's
input, and the delta is added to what the MLP writes.

Position 0 (BOS, the attention sink) and the chat template's special tokens are left alone
unless asked for (``Sampling.steer_special``): the SAE never saw them in training, and
their huge activations are what the model's attention leans on.

``generate_pair`` decodes the baseline (row 0) and the steered reply (row 1) as one batch
of two with one seed, so the replies differ only where the steering makes them differ and
both cost the same wall-clock time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from training.data.models import LoadedModel
from training.inference.sampling import (
    Edit,
    Sampling,
    decode_rows,
    decode_rows_with_top,
    edit_at,
)
from training.sae.autoencoder import SparseAutoencoder

__all__ = ["STEERED_ROWS", "Sampling", "Steer", "chat_prompt_ids", "generate",
           "generate_pair", "steering_edit"]

SteerMode = Literal["clamp", "add", "cap"]
STEER_MODES: tuple[str, ...] = ("clamp", "add", "cap")
STEERED_ROWS = slice(1, 2)
"""The rows an edit for ``generate_pair`` must be restricted to (row 0 is the baseline)."""


@dataclass(frozen=True)
class Steer:
    """One latent's steering."""

    feature: int
    """Latent index f."""
    mode: SteerMode
    """``clamp`` holds z_f at the target; ``add`` adds the target along W_dec[f]."""
    value: float
    """v, in units of the latent's max activation (the target is v·max_f)."""


@dataclass(frozen=True)
class _Plan:
    """Steers as tensors on the SAE's device: features [s], targets v·max [s], 0/1 masks
    [s] of the clamps and the caps, the decoder rows [s, d] and their norms [s]."""

    features: Tensor
    targets: Tensor
    clamp: Tensor
    cap: Tensor
    rows: Tensor
    norms: Tensor


def steering_edit(sae: SparseAutoencoder, steers: Sequence[Steer],
                  max_activations: Mapping[int, float], rows: slice | None = None
                  ) -> Edit:
    """An edit (h [B, T, d], steerable [B, T] or None) -> h' of block L's output (maths in
    the module docstring): positions where ``steerable`` is False keep h; ``rows`` limits
    the edit to a batch slice. The SAE should be in eval mode (as ``load_sae`` returns it):
    a BatchTopK SAE in training mode moves its threshold."""
    plan = _plan(sae, steers, max_activations)
    d = sae.cfg.d_in

    def edit(h: Tensor, steerable: Tensor | None = None, source: Tensor | None = None
             ) -> Tensor:
        if h.shape[-1] != d:
            raise ValueError(f"the SAE reads width {d} but block output has {h.shape[-1]}")
        if plan is None:
            return h
        source = h if source is None else source
        part = h if rows is None else h[rows]
        code_of = source if rows is None else source[rows]
        delta = _delta(sae, part.reshape(-1, d), plan,
                       code_of.reshape(-1, d)).reshape(part.shape)
        if steerable is not None:
            mask = steerable if rows is None else steerable[rows]
            delta = delta * mask[..., None].to(delta.dtype)
        edited = part + delta.to(device=h.device, dtype=h.dtype)
        if rows is None:
            return edited
        out = h.clone()
        out[rows] = edited
        return out

    return edit_at(edit, sae.cfg.site)


def _plan(sae: SparseAutoencoder, steers: Sequence[Steer],
          max_activations: Mapping[int, float]) -> _Plan | None:
    """Validate the steers and gather what the edit needs; None when there are none."""
    n = sae.cfg.n_latents
    seen: set[int] = set()
    for steer in steers:
        f = steer.feature
        if not 0 <= f < n:
            raise ValueError(f"feature {f} is out of range: the SAE has {n} latents")
        if steer.mode not in STEER_MODES:
            raise ValueError(f"feature {f}: unknown steering mode {steer.mode!r} "
                             f"(choose {' or '.join(STEER_MODES)})")
        if not math.isfinite(steer.value):
            raise ValueError(f"feature {f}: steering value must be finite (got {steer.value})")
        if f not in max_activations:
            raise ValueError(f"feature {f} has no max activation: analyse the SAE first")
        if f in seen:
            raise ValueError(f"feature {f} is steered twice")
        seen.add(f)
    if not steers:
        return None
    w_dec = sae.w_dec.detach()
    features = torch.tensor([s.feature for s in steers], device=w_dec.device)
    targets = [s.value * float(max_activations[s.feature]) for s in steers]

    def mask(mode: str) -> Tensor:
        return torch.tensor([s.mode == mode for s in steers], dtype=w_dec.dtype,
                            device=w_dec.device)

    rows = w_dec[features]
    return _Plan(features=features,
                 targets=torch.tensor(targets, dtype=w_dec.dtype, device=w_dec.device),
                 clamp=mask("clamp"), cap=mask("cap"), rows=rows,
                 norms=rows.norm(dim=1).clamp_min(1e-12))


def _delta(sae: SparseAutoencoder, x: Tensor, plan: _Plan, source: Tensor | None = None
           ) -> Tensor:
    """Σ_s coef_s·W_dec[f_s] for x [N, d] -> [N, d] (SAE dtype); coef = v·max − z_f for a
    clamp, v·max for an add, −max(0, x·u − v·max·‖W_dec[f]‖)/‖W_dec[f]‖ for a cap. z_f is
    the code of ``source`` (a transcoder's input; x itself by default). The SAE is only
    run when some steer clamps."""
    x = x.to(device=plan.rows.device, dtype=plan.rows.dtype)
    coef = (plan.targets * (1 - plan.cap)).expand(x.shape[0], -1)
    if bool(plan.clamp.any()):
        code_of = x if source is None else source.to(device=x.device, dtype=x.dtype)
        coef = coef - latent_values(sae, code_of, plan.features) * plan.clamp
    if bool(plan.cap.any()):
        along = (x @ plan.rows.t()) / plan.norms  # x·u_f [N, s]
        excess = torch.relu(along - plan.targets * plan.norms)
        coef = coef - excess / plan.norms * plan.cap
    return coef @ plan.rows


def latent_values(sae: SparseAutoencoder, x: Tensor, features: Tensor) -> Tensor:
    """z_f of x [N, d] for each f in features [s] -> [N, s]: the sparse code's value where
    f is among the selected latents, else 0."""
    with torch.no_grad():
        enc = sae.encode(x)
    match = enc.indices.unsqueeze(-1) == features
    return (enc.values.unsqueeze(-1) * match).sum(1)


def conversation_ids(lm: LoadedModel, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids of a conversation (``{"role", "content"}`` messages) awaiting the
    assistant's next turn: the chat template when the tokenizer has one, else BOS + the
    contents one per line."""
    if not messages or not any(m["content"].strip() for m in messages):
        raise ValueError("the messages are empty")
    tokenizer = lm.tokenizer
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([dict(m) for m in messages],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return [int(token) for token in ids]
    text = "\n".join(m["content"] for m in messages)
    return [lm.bos_id, *tokenizer.encode(text, add_special_tokens=False)]


def chat_prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """The ids of ``prompt`` as a user turn awaiting the assistant's reply: the tokenizer's
    chat template when it has one, else BOS + the text."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return conversation_ids(lm, [{"role": "user", "content": prompt}])


def text_prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """BOS + ``prompt`` as plain text, to be continued (no chat template)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return [lm.bos_id, *lm.tokenizer.encode(prompt, add_special_tokens=False)]


def generate_pair(lm: LoadedModel, layer: int, edit: Edit | None,
                  prompt_ids: list[int], sampling: Sampling, *, top: int = 0
                  ) -> Iterator[tuple]:
    """Baseline (row 0) and steered (row 1) replies as one batch; yields (row, text piece),
    or (row, text piece, [(token, logprob)] * top) with ``top`` (see decode_rows_with_top).

    ``edit`` must be built with ``rows=STEERED_ROWS`` so that row 0 stays unsteered; with
    None both rows still run (row 1 then repeats row 0), keeping the timing comparable.
    """
    if top:
        return decode_rows_with_top(lm, prompt_ids, 2, sampling, layer=layer, edit=edit,
                                    top=top)
    return decode_rows(lm, prompt_ids, 2, sampling, layer=layer, edit=edit)


def generate(lm: LoadedModel, layer: int, edit: Edit | None,
             prompt_ids: list[int], sampling: Sampling, *,
             ignore_eos: bool = False) -> Iterator[str]:
    """One reply (a batch of one), streamed as text pieces; ``ignore_eos`` decodes exactly
    ``sampling.max_tokens`` tokens (benchmarks)."""
    rows = decode_rows(lm, prompt_ids, 1, sampling, layer=layer, edit=edit,
                       ignore_eos=ignore_eos)
    return (piece for _, piece in rows)
