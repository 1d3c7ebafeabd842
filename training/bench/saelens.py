"""Training throughput of SAELens' own TopK SAE trainer on cached activations (a baseline).

``sae_lens`` is imported lazily inside :func:`saelens_topk_throughput`, so this module
imports without it (install ``sae-lens`` in a separate environment, e.g. ``.venv-bench``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import torch


def saelens_topk_throughput(acts: torch.Tensor, d_sae: int, k: int, batch: int, lr: float,
                            seed: int, device: str = "cpu") -> dict[str, Any]:
    """Train SAELens' TopK SAE for one pass over ``acts`` [N, d]; time it.

    What runs is SAELens' own training stack, as ``LanguageModelSAERunner`` drives it
    (sae-lens 6.54.x), minus the language model and activation store:

    * ``sae_lens.TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae, k, dtype="float32",
      device="cpu"))`` with SAELens' defaults otherwise: decoder rows initialised to norm
      0.1 with ``W_enc = W_decᵀ``, ``rescale_acts_by_decoder_norm=True``, AuxK loss
      coefficient 1.0, dense (not sparse) activations;
    * ``sae_lens.training.sae_trainer.SAETrainer(cfg=SAETrainerConfig(...), sae, data_provider)``
      and its ``fit()``: per step ``SAETrainer.step`` -> ``_train_step`` =
      ``TrainingSAE.training_forward_pass`` (MSE summed over d, mean over tokens, plus the
      TopK AuxK loss on latents dead for more than ``dead_feature_window`` = 1000 steps),
      ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``torch.optim.Adam`` (betas 0.9/0.999)
      ``step``/``zero_grad``, the constant LR scheduler, and the firing statistics. No
      autocast, no wandb, no checkpoints, no input normalisation.

    ``acts`` is consumed in order, ``batch`` rows at a time (a trailing partial batch is
    dropped); ``seed`` seeds the SAE initialisation. Everything is float32 on ``device``.

    Returns ``tokens_per_s`` (tokens trained / wall time of ``fit()``), ``seconds``,
    ``tokens``, ``steps``, ``threads``, ``sae_lens_version`` and ``sae_state``: float32
    ``W_enc`` [d, d_sae], ``b_enc``, ``W_dec`` [d_sae, d], ``b_dec`` after SAELens'
    ``process_state_dict_for_saving_inference`` (decoder norms folded in), so that
    ``z = TopK_k(ReLU((x - b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec`` is exactly
    what SAELens computes and held-out FVU can be measured with saelab's own code.
    """
    import sae_lens

    if acts.dim() != 2:
        raise ValueError(f"acts must be [N, d], got shape {tuple(acts.shape)}")
    acts = acts.detach().to(device, torch.float32).contiguous()
    steps = acts.shape[0] // batch
    if steps < 1:
        raise ValueError(f"need at least one full batch of {batch} tokens (got {acts.shape[0]})")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in [1, d_sae] (got k={k}, d_sae={d_sae})")
    torch.manual_seed(seed)
    sae, trainer = _saelens_trainer(acts, d_sae, k, batch, steps, lr, device)
    seconds = _fit_quietly(trainer)
    tokens = steps * batch
    return {
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "tokens": tokens,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "sae_lens_version": str(sae_lens.__version__),
        "sae_state": _inference_state(sae),
    }


def _saelens_trainer(acts: torch.Tensor, d_sae: int, k: int, batch: int, steps: int,
                     lr: float, device: str):
    """SAELens' TopK training SAE and its ``SAETrainer`` over ``acts`` in order."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k,
                                                dtype="float32", device=device))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr / 10,  # what LanguageModelSAERunnerConfig sets (unused when constant)
        device=device,
        autocast=False,
        logger=LoggingConfig(log_to_wandb=False),
    )

    def batches() -> Iterator[torch.Tensor]:
        for i in range(steps):
            yield acts[i * batch:(i + 1) * batch]

    return sae, SAETrainer(cfg=cfg, sae=sae, data_provider=batches(), evaluator=None)


def _fit_quietly(trainer) -> float:
    """Wall seconds of ``trainer.fit()`` with its progress bar silenced."""
    from sae_lens.training import sae_trainer

    bar = sae_trainer.tqdm
    sae_trainer.tqdm = functools.partial(bar, disable=True)
    try:
        start = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - start
    finally:
        sae_trainer.tqdm = bar


def _inference_state(sae) -> dict[str, torch.Tensor]:
    """The trained weights as SAELens saves them for inference (decoder norms folded in)."""
    with torch.no_grad():
        state = {name: value.detach().clone() for name, value in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state)
    return {name: state[name].to("cpu", torch.float32).contiguous()
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
