"""Explorer latency: feature pages vs the trivial ``/healthz`` route under the same load.

The real app runs under uvicorn in a thread of this process, on a free port of 127.0.0.1.
``clients`` concurrent tasks share one ``httpx.AsyncClient`` and work through a fixed list
of URLs per phase. The phases alternate trivial / feature ``rounds`` times after one
discarded warm-up phase of each, so both routes see the same machine state; each route
gets ``requests`` timed GETs in all (random latent indices, seeded, for the feature
pages). Latency is per request, queueing at the server included. Client and server share
this process (and its GIL), so each figure carries the client's own cost too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from app.settings import Settings

TRIVIAL = "/healthz"
HOST = "127.0.0.1"
Phase = tuple[str, list[str], bool]
"""(route label, paths to fetch, whether the phase is timed)."""


@dataclass
class RouteLoad:
    """What one route's timed phases produced."""

    latencies_ms: list[float] = field(default_factory=list)
    """One entry per answered request, whatever its status."""
    bad_status: int = 0
    """Answers other than 200."""
    failed: int = 0
    """Requests that raised (connection errors, timeouts)."""
    seconds: float = 0.0
    """Wall time of the route's timed phases."""

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.latencies_ms) or [float("nan")]
        requests = len(self.latencies_ms) + self.failed
        return {"requests": requests, "errors": self.bad_status + self.failed,
                "p50_ms": statistics.median(ordered), "p95_ms": _percentile(ordered, 95),
                "max_ms": ordered[-1],
                "requests_per_s": requests / self.seconds if self.seconds else 0.0}


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def feature_paths(sae_id: int, n_latents: int, count: int, rng: random.Random) -> list[str]:
    return [f"/saes/{sae_id}/features/{rng.randrange(n_latents)}" for _ in range(count)]


def bench_web(settings: Settings, sae_id: int, n_latents: int, *, clients: int = 32,
              requests: int = 400, rounds: int = 2, seed: int = 0) -> dict[str, Any]:
    """Latency of ``/saes/{sae_id}/features/{i}`` and ``/healthz`` under ``clients``
    concurrent clients; ``ratio`` is feature p95 / trivial p95."""
    if clients < 1 or requests < rounds:
        raise ValueError(f"--clients must be positive and --requests at least {rounds}")
    rng = random.Random(seed)
    warmup = min(requests, 2 * clients)
    plan: list[Phase] = [("trivial", [TRIVIAL] * warmup, False),
                         ("feature", feature_paths(sae_id, n_latents, warmup, rng), False)]
    for share in _shares(requests, rounds):
        plan.append(("trivial", [TRIVIAL] * share, True))
        plan.append(("feature", feature_paths(sae_id, n_latents, share, rng), True))
    from app.web.main import create_app
    from app.web.serve import serve_in_thread

    with serve_in_thread(create_app(settings), HOST, 0) as base_url, \
            _quiet("httpx", "httpcore"):
        loads = asyncio.run(_run_plan(base_url, plan, clients))
    trivial, feature = loads["trivial"].summary(), loads["feature"].summary()
    return {"bench": "web", "sae_id": sae_id, "n_latents": n_latents, "clients": clients,
            "rounds": rounds, "warmup_requests": warmup, "seed": seed,
            "feature": feature, "trivial": trivial,
            "ratio": feature["p95_ms"] / trivial["p95_ms"]}


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the per-request INFO lines of these loggers (their cost is the client's)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


async def _run_plan(base_url: str, plan: list[Phase], clients: int) -> dict[str, RouteLoad]:
    import httpx

    loads = {"trivial": RouteLoad(), "feature": RouteLoad()}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60.0,
                                 trust_env=False) as client:
        for route, paths, timed in plan:
            load = loads[route] if timed else RouteLoad()
            start = time.perf_counter()
            await _phase(client, paths, clients, load)
            load.seconds += time.perf_counter() - start
    return loads


async def _phase(client, paths: list[str], clients: int, load: RouteLoad) -> None:
    """``paths`` fetched by ``clients`` tasks, each taking the next one until none is left."""
    pending = iter(paths)

    async def worker() -> None:
        for path in pending:
            await _get(client, path, load)

    await asyncio.gather(*(worker() for _ in range(min(clients, len(paths)))))


async def _get(client, path: str, load: RouteLoad) -> None:
    start = time.perf_counter()
    try:
        response = await client.get(path)
        await response.aread()
    except Exception:  # any failure counts as an error, the run goes on
        load.failed += 1
        return
    load.latencies_ms.append(1000 * (time.perf_counter() - start))
    if response.status_code != 200:
        load.bad_status += 1
