"""Data-parallel training over torch.distributed (torchrun: gloo on CPU, nccl on GPU).

Every rank reads the same global batch stream and trains on its own contiguous slice. The
loss terms are normalised by *global* statistics (``DistContext.sum``) and gradients are
summed, so P processes take exactly the optimiser steps one process takes on the whole
global batch: the result matches the single-process run up to float summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; a world of 1 means no torch.distributed at all."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> DistContext:
        """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def local_slice(self, batch: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch [B, d] (B divisible by world)."""
        if self.world == 1:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; the input is left alone)."""
        if self.world == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenation of every rank's 1-D tensor (all of the same length)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def sum_gradients_(self, module: nn.Module) -> None:
        """All-reduce (sum) every parameter gradient in one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
