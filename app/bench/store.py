"""Store benchmarks: bulk persist time of an analysis and the explorer's query latencies.

A synthetic analysis of ``n`` latents × ``examples`` examples (33-token windows) is written
with the real ``save_analysis`` into a fresh database, then each explorer query is timed
(median of ``repeats``). Its windows follow one of two profiles:

* ``demo`` (the default): what the demo SAE's analysis holds (4,096 latents, measured from
  its packed rows): a third of a latent's window tokens are distinct (token ids drawn with
  a heavy head, as text repeats " the", "," and "\n"), token texts of ~4.5 characters, and
  5% of window tokens where the latent fires (the peak and scattered others);
* ``dense``: the worst case for the packing: almost every token distinct (uniform over
  5,000 ids, 7-character texts) and every activation nonzero.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from app.store.db import make_engine, session_factory, upgrade
from app.store.persist import save_analysis
from app.store.queries import get_latent, latents_by_index, list_latents, list_saes
from training.analysis.cofiring import CoFiring
from training.analysis.examples import ExampleSet
from training.analysis.sinks import SinkReport

WORDS = ["python", "keyword", "closing", "bracket", "number", "string", "function", "class",
         "import", "comment", "plural", "verb", "name", "date", "list", "loop"]


PROFILES = ("demo", "dense")


def synthetic_analysis(n: int, examples: int, seed: int = 0, profile: str = "demo"
                       ) -> tuple[Any, dict[int, str]]:
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r} is unknown: choose one of "
                         f"{', '.join(PROFILES)}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (n, 10), generator=g)
    vals = torch.rand(n, 10, generator=g)
    rank = torch.arange(examples).repeat(n)
    rows = n * examples
    if profile == "dense":
        tokens = torch.randint(0, 5000, (rows, 33), generator=g)
        activations = torch.rand(rows, 33, generator=g) * 4
        text = {i: f"tok{i:04d}" for i in range(5100)}
    else:
        tokens = (5000 * torch.rand(rows, 33, generator=g) ** 8).long()
        activations = torch.rand(rows, 33, generator=g) * 4
        activations[torch.rand(rows, 33, generator=g) > 0.035] = 0
        activations[:, 16] = 1 + torch.rand(rows, generator=g) * 3  # the peak
        text = {i: f"t{i}" for i in range(5100)}
    per_latent = ExampleSet(
        latent=torch.arange(n).repeat_interleave(examples),
        bucket=torch.where(rank < 20, -1, (rank - 20) // 5), rank=rank % 20,
        context=torch.arange(rows), position=torch.full((rows,), 16),
        tokens=tokens, activations=activations)
    result = SimpleNamespace(
        tokens=1_000_000, density=torch.rand(n, generator=g).double() * 0.01,
        mean_activation=torch.rand(n, generator=g), max_activation=torch.rand(n, generator=g),
        histogram_scale=torch.full((n,), 4.0),
        histogram_counts=torch.randint(0, 100, (n, 64), generator=g),
        top_logits=vals, top_logit_ids=ids, bottom_logits=-vals, bottom_logit_ids=ids,
        neighbour_ids=ids, neighbour_cosines=vals, examples=per_latent,
        sinks=SinkReport(sink=torch.zeros(n, dtype=torch.bool), scale_ratio=torch.ones(n),
                         position_share=torch.zeros(n), token_share=torch.zeros(n),
                         median_max=1.0),
        cofiring=CoFiring(ids=ids, jaccard=vals, conditional=vals, tokens=16_384))
    return result, text


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_store(url: str, n: int = 16384, examples: int = 70, repeats: int = 20,
                profile: str = "demo") -> dict[str, Any]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    result, text = synthetic_analysis(n, examples, profile=profile)
    start = time.perf_counter()
    sae_id = save_analysis(sessions, sae_dir=Path("/bench/sae"), sae_cfg={
        "architecture": "topk", "hook_layer": 6, "d_in": 576, "d_sae": n, "k": 32},
        model_name="bench-model", d_model=576, n_layers=30, result=result, token_text=text)
    persist_s = time.perf_counter() - start
    with sessions.begin() as session:  # explanations for the search query
        for latent in list_latents(session, sae_id, limit=n):
            latent.explanation = " ".join(WORDS[(latent.index * k) % len(WORDS)]
                                          for k in (1, 3, 5))
    queries = {
        "list_by_density": lambda s: list_latents(s, sae_id, sort="density", limit=50),
        "list_by_max_activation": lambda s: list_latents(s, sae_id, sort="max_activation",
                                                         limit=50),
        "search_explanations": lambda s: list_latents(s, sae_id, search="python keyword",
                                                      limit=50),
        "latent_with_examples": lambda s: get_latent(s, sae_id, n // 2).examples,
        "latents_by_ids": lambda s: latents_by_index(s, sae_id, list(range(0, n, n // 50))),
        "saes_of_model": lambda s: list_saes(s, "bench-model"),
    }
    timings = {}
    for name, query in queries.items():
        with sessions() as session:
            timings[name] = _median_ms(lambda q=query, s=session: (q(s), s.expunge_all()),
                                       repeats)
    engine.dispose()
    return {"bench": "store", "dialect": engine.dialect.name, "latents": n,
            "examples_per_latent": examples, "profile": profile, "persist_s": persist_s,
            **{f"{k}_ms": v for k, v in timings.items()}}
