"""Timing helpers of the benchmarks: a synchronised wall-clock timer and the dense-matmul
reference every throughput is compared with."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def timed(fn) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_flops(d: int, n: int, batch: int, device: torch.device, repeats: int = 20) -> float:
    """FLOP/s of a plain fp32 [batch, d] x [d, n] matmul (median of ``repeats``, after
    three warm-up products)."""
    x = torch.randn(batch, d, device=device)
    w = torch.randn(n, d, device=device)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = [timed(lambda: torch.nn.functional.linear(x, w))[0] for _ in range(repeats)]
    return 2 * batch * d * n / statistics.median(times)
