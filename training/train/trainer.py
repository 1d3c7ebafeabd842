"""The SAE training step, decoupled from where batches come from.

``Trainer.step`` takes one global batch [B, d] of raw activations and does one Adam step:
scale by the dataset-level input scale, take this rank's slice, forward (FVU + α·AuxK),
backward through the sparse kernels, sum gradients across ranks, project out the decoder
gradient parallel to each decoder row, step, renormalise the decoder rows, update the
dead-latent counters. The schedule is linear warm-up, constant, then linear decay to zero.
A transcoder's batch rows are MLP input ‖ output [B, 2d]; input and output each have their
own dataset-level scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from training.sae.autoencoder import TRAINABLE, SaeConfig, SparseAutoencoder
from training.train.distributed import DistContext


@dataclass
class TrainConfig:
    """Optimisation settings (saved next to the SAE in ``cfg.json`` under ``train``)."""

    batch: int = 4096
    """Global batch in tokens (split evenly over ranks)."""
    tokens: int | None = None
    """Training tokens; None means one pass over the captured activations."""
    lr: float | None = None
    """Adam learning rate; None means 2e-4 / √(n / 2¹⁴) (Gao et al.'s scaling)."""
    warmup_steps: int = 1000
    """Linear warm-up; capped at 10% of the run."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the lr decays linearly to zero."""
    seed: int = 0
    b_dec_init: Literal["median", "mean"] = "median"
    """b_dec starts at the geometric median (or mean) of a data sample."""
    init_rows: int = 8192
    """Rows sampled to estimate the input scale and b_dec."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0 disables them)."""
    log_every: int | None = None
    """Steps between loss-curve points [default: about 500 points over the run, every
    step for runs shorter than that]."""
    holdout_rows: int = 8192
    """Final rows of the capture kept out of training for the held-out FVU."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The encoder's dense matmul in bf16 (the weights, the optimiser and every other
    product stay fp32); ``bench precision`` measures what it costs in FVU."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision: choose fp32 or bf16 (got {self.precision!r})")
        if self.batch < 1:
            raise ValueError("--batch must be positive")
        if self.tokens is not None and self.tokens < self.batch:
            raise ValueError(f"--tokens ({self.tokens}) must be at least one --batch "
                             f"({self.batch})")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ValueError("--lr must be in (0, 1)")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError("decay_fraction must be in [0, 1]")
        if self.log_every is not None and self.log_every < 1:
            raise ValueError("log_every must be positive")

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_latents / 2**14)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class StepStats:
    """Figures of one step (global over ranks)."""

    step: int
    tokens: int
    fvu: float
    auxk: float
    l0: float
    dead_fraction: float
    lr: float


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * (1 - decay_fraction))
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


def geometric_median(points: Tensor, iterations: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising Σ‖p_i − m‖ (points [N, d] -> [d])."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() < eps * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median


class Trainer:
    """Owns an SAE, its optimiser and the dead-latent counters."""

    def __init__(self, sae_cfg: SaeConfig, cfg: TrainConfig, total_steps: int,
                 dist: DistContext | None = None, device: torch.device | None = None) -> None:
        self.dist = dist or DistContext()
        if sae_cfg.architecture not in TRAINABLE:
            raise ValueError(f"--arch {sae_cfg.architecture}: saelab trains "
                             f"{' and '.join(TRAINABLE)} SAEs (JumpReLU ones are imported)")
        if cfg.batch % self.dist.world:
            raise ValueError(f"--batch {cfg.batch} is not divisible by --nproc {self.dist.world}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.device = device or torch.device("cpu")
        torch.manual_seed(cfg.seed)
        # the dead window of this run, fixed now (and saved with the SAE)
        sae_cfg = sae_cfg.for_run(total_steps * cfg.batch, cfg.batch)
        self.sae = SparseAutoencoder(sae_cfg).to(self.device)
        self.sae.matmul_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.base_lr = cfg.learning_rate(sae_cfg.n_latents)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr)
        self.steps_done = 0
        self.input_scale = 1.0
        self.target_scale = 1.0
        """A transcoder's output scale (E‖s·y‖² = d); unused by an SAE."""
        self.tokens_since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.long,
                                              device=self.device)

    def initialise(self, sample: Tensor, input_scale: float, center: Tensor | None = None,
                   target_scale: float = 1.0) -> None:
        """Set the scales and b_dec from a raw sample [N, d] ([N, 2d] for a transcoder:
        b_dec starts at the outputs' centre), identical on all ranks; ``center`` is its
        scaled geometric median when already computed (a sweep)."""
        self.input_scale, self.target_scale = input_scale, target_scale
        scaled = self.split(sample.to(self.device, torch.float32))[1]
        if center is None:
            center = (geometric_median(scaled) if self.cfg.b_dec_init == "median"
                      else scaled.mean(0))
        with torch.no_grad():
            self.sae.b_dec.copy_(center)

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.sae.cfg.dead_tokens

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled (input, what to reconstruct) of raw rows: (x, x) for an SAE, (x, y) for a
        transcoder's rows x ‖ y."""
        if not self.sae.cfg.transcoder:
            x = rows * self.input_scale
            return x, x
        d = self.sae.cfg.d_in
        return rows[:, :d] * self.input_scale, rows[:, d:] * self.target_scale

    def step(self, global_batch: Tensor) -> StepStats:
        """One optimiser step on a global batch [B, d] (or [B, 2d]) of raw activations."""
        x, y = self.split(self.dist.local_slice(global_batch).to(self.device, torch.float32))
        lr = self.base_lr * lr_factor(self.steps_done, self.total_steps, self.cfg.warmup_steps,
                                      self.cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.sae(x, self.dead_mask, target=y, reduce_sum=self.dist.sum,
                       gather=self.dist.gather)
        loss = out.fvu + out.nested_fvu + self.sae.cfg.aux_coef * out.auxk_loss
        loss.backward()
        self.dist.sum_gradients_(self.sae)
        self.sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.unit_norm_decoder_()
        l0 = self._track_firing(out.encoding.values, out.encoding.indices, global_batch.shape[0])
        self.steps_done += 1
        return StepStats(self.steps_done, self.steps_done * global_batch.shape[0],
                         float(self.dist.sum(out.fvu.detach())),
                         float(self.dist.sum(out.auxk_loss.detach())), l0,
                         float(self.dead_mask.float().mean()), lr)

    def _track_firing(self, values: Tensor, indices: Tensor, global_tokens: int) -> float:
        """Update tokens-since-fired from this batch; returns the global mean L0."""
        active = values > 0
        counts = torch.zeros_like(self.tokens_since_fired).index_add_(
            0, indices[active], torch.ones_like(indices[active]))
        counts = self.dist.sum(counts)
        self.tokens_since_fired += global_tokens
        self.tokens_since_fired[counts > 0] = 0
        return float(counts.sum()) / global_tokens

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps_done": self.steps_done, "input_scale": self.input_scale,
                "target_scale": self.target_scale,
                "tokens_since_fired": self.tokens_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self.input_scale = float(state["input_scale"])
        self.target_scale = float(state.get("target_scale", 1.0))
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
