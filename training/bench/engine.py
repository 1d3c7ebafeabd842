"""Benchmarks behind ``saelab bench capture``, ``train`` and ``analysis``, and of steering.

Each measures side by side in one process, on the same inputs, so that the ratios are
meaningful on a noisy machine; each returns a flat JSON-able dict whose last keys are the
ratios.

* capture: tokens/s of the early-stopping capture (``hooks.block_output``) against a naive
  full forward with ``output_hidden_states=True``, batch for batch on the same contexts,
  alternating the two, median over batches; the two outputs are checked to be equal.
* train: tokens/s and held-out FVU of saelab's trainer against SAELens' TopK trainer
  (``training.bench.saelens``; skipped with a notice when ``sae_lens`` is not installed) on
  the same cached activation batches in the same order, with the same d, n, k, batch, lr
  and fp32. Held-out figures of both SAEs come from the same code on the same rows. The
  reference is a plain dense matmul of the encoder's shape: the encoder forward
  (2·d·n FLOP per token) is the one dense product left, so ``matmul FLOP/s / (2·d·n)`` is
  the throughput limit and ``flops_fraction`` says how close each trainer gets to it.
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.data.activations import ActivationStore
from training.data.corpus import iter_texts, pack_contexts
from training.data.hooks import block_output
from training.data.models import LoadedModel
from training.inference.steering import Sampling, Steer, chat_prompt_ids, generate, steering_edit
from training.sae.autoencoder import SaeConfig, SparseAutoencoder
from training.sae.folder import load_sae
from training.train.run import heldout_stats, train
from training.train.trainer import TrainConfig


# -- capture ----------------------------------------------------------------------------
def bench_capture(lm: LoadedModel, *, layer: int, batches: int = 6, batch: int = 8,
                  context: int = 128, dataset: str = "embedded") -> dict[str, Any]:
    """Early-stop capture vs ``output_hidden_states=True`` on ``batches`` batches
    [batch, context] of ``dataset``; the first batch of each is a discarded warm-up."""
    lm.check_layer(layer)
    stream = pack_contexts(iter_texts(dataset), lm.tokenizer, context, lm.bos_id)
    groups = [torch.tensor(g) for g in _chunks(stream, batch, batches + 1)]
    if len(groups) < 2:
        raise ValueError(f"--dataset {dataset} has too little text for two batches")
    ours, naive, max_diff = [], [], 0.0
    for index, ids in enumerate(groups):
        ids = ids.to(lm.device)
        t_ours, early = _timed(lambda ids=ids: block_output(lm.model, lm.blocks, layer, ids))
        t_naive, full = _timed(lambda ids=ids: _hidden_states(lm, ids)[layer + 1])
        max_diff = max(max_diff, float((early.float() - full.float()).abs().max()))
        if index:
            ours.append(t_ours)
            naive.append(t_naive)
    tokens = batch * context
    ours_tps, naive_tps = tokens / statistics.median(ours), tokens / statistics.median(naive)
    return {"bench": "capture", "model": lm.name, "layer": layer, "n_layers": lm.n_layers,
            "batch": batch, "context": context, "batches": len(ours),
            "threads": torch.get_num_threads(), "device": str(lm.device),
            "max_abs_diff": max_diff, "naive_tokens_per_s": naive_tps,
            "saelab_tokens_per_s": ours_tps, "speedup": ours_tps / naive_tps}


@torch.inference_mode()
def _hidden_states(lm: LoadedModel, ids: Tensor) -> tuple[Tensor, ...]:
    return lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _chunks(stream, size: int, count: int) -> list[list[list[int]]]:
    groups = []
    for _ in range(count):
        group = list(itertools.islice(stream, size))
        if len(group) < size:
            break
        groups.append(group)
    return groups


def _timed(fn) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- train ------------------------------------------------------------------------------
def saelens_available() -> bool:
    return importlib.util.find_spec("sae_lens") is not None


def matmul_flops(d: int, n: int, batch: int, device: torch.device, repeats: int = 20) -> float:
    """FLOP/s of a plain fp32 [batch, d] x [d, n] matmul (median of ``repeats``, after
    three warm-up products)."""
    x = torch.randn(batch, d, device=device)
    w = torch.randn(n, d, device=device)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    times = [_timed(lambda: torch.nn.functional.linear(x, w))[0] for _ in range(repeats)]
    return 2 * batch * d * n / statistics.median(times)


def bench_train(acts: Path, work: Path, *, n_latents: int = 8192, k: int = 32,
                batch: int = 4096, tokens: int = 81_920, holdout: int = 8192,
                lr: float | None = None, seed: int = 0, with_saelens: bool = True
                ) -> dict[str, Any]:
    """saelab's trainer vs SAELens' on the capture ``acts`` (see the module docstring)."""
    store = ActivationStore(acts)
    store.verify()
    if len(store) < max(tokens + holdout, 10 * holdout):
        raise ValueError(f"{acts} holds {len(store)} rows; --tokens {tokens} plus "
                         f"{holdout} held-out rows (and at least 10x the held-out rows) "
                         "are needed")
    d = store.d_model
    sae_cfg = SaeConfig(d_in=d, n_latents=n_latents, k=k)
    train_cfg = TrainConfig(batch=batch, tokens=tokens, lr=lr, seed=seed, checkpoint_every=0,
                            holdout_rows=holdout)
    rate = train_cfg.learning_rate(n_latents)
    train_rows = len(store) - holdout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flops = matmul_flops(d, n_latents, batch, device)
    limit = flops / (2 * d * n_latents)
    result: dict[str, Any] = {
        "bench": "train", "d": d, "n": n_latents, "k": k, "batch": batch, "tokens": tokens,
        "holdout": holdout, "lr": rate, "threads": torch.get_num_threads(),
        "device": str(device), "matmul_gflops": flops / 1e9, "dense_limit_tokens_per_s": limit}
    heldout = store.tail(holdout)

    metrics = train(acts, work / "saelab", sae_cfg, train_cfg, progress=False)
    ours_sae, _ = load_sae(work / "saelab", device)
    ours = {"tokens_per_s": metrics["tokens_per_s"], **heldout_stats(ours_sae, heldout)}
    ours["flops_fraction"] = ours["tokens_per_s"] / limit
    result["saelab"] = ours

    if not with_saelens or not saelens_available():
        result["saelens"] = {"skipped": "sae_lens is not installed: pip install "
                             "'saelab[bench]' (or bash scripts/setup.sh --bench) to compare"}
        return result
    theirs = _saelens_run(store, train_rows, sae_cfg, batch, tokens, rate, seed, device)
    theirs.update(heldout_stats(theirs.pop("sae").to(device), heldout))
    theirs["flops_fraction"] = theirs["tokens_per_s"] / limit
    result["saelens"] = theirs
    result["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    result["fvu_ratio"] = ours["heldout_fvu"] / theirs["heldout_fvu"]
    return result


def _saelens_run(store: ActivationStore, train_rows: int, sae_cfg: SaeConfig, batch: int,
                 tokens: int, lr: float, seed: int, device: torch.device) -> dict[str, Any]:
    """SAELens' trainer on the batches saelab's trainer saw, in the same order."""
    from training.bench.saelens import saelens_topk_throughput

    stream = store.iter_shuffled(batch, seed=seed, limit_rows=train_rows)
    acts = torch.cat(list(itertools.islice(stream, tokens // batch)))
    run = saelens_topk_throughput(acts, sae_cfg.n_latents, sae_cfg.k, batch, lr, seed,
                                  device=str(device))
    state = run.pop("sae_state")
    sae = SparseAutoencoder(sae_cfg)
    sae.load_state_dict({"w_enc": state["W_enc"].t(), "b_enc": state["b_enc"],
                         "w_dec": state["W_dec"], "b_dec": state["b_dec"],
                         "threshold": torch.tensor(0.0)})
    return {"tokens_per_s": run["tokens_per_s"], "version": run["sae_lens_version"],
            "sae": sae}


# -- analysis ---------------------------------------------------------------------------
def bench_analysis(sae: SparseAutoencoder, store: ActivationStore, unembed: Tensor, *,
                   tokens: int) -> dict[str, Any]:
    """Whole-analysis tokens/s (the pass over the capture, examples, logit effects,
    neighbours) vs plain sparse SAE encoding (``sae.encode``) of the same chunks."""
    from training.analysis.latents import AnalysisConfig, _chunks, analyse_capture, chunk_size

    cfg = AnalysisConfig()
    per_context = store.manifest.rows_per_context
    contexts = min(store.manifest.contexts, -(-tokens // per_context))
    start = time.perf_counter()
    with torch.no_grad():
        for _, acts in _chunks(store, chunk_size(cfg, per_context, sae.cfg.n_latents),
                                  contexts):
            sae.encode(acts.reshape(-1, acts.shape[-1]).float().to(sae.b_dec.device))
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    result = analyse_capture(sae, store, unembed, cfg, max_tokens=tokens, progress=False)
    analysis_s = time.perf_counter() - start
    encode_tps, analysis_tps = result.tokens / encode_s, result.tokens / analysis_s
    return {"bench": "analysis", "n": sae.cfg.n_latents, "tokens": result.tokens,
            "threads": torch.get_num_threads(), "encode_tokens_per_s": encode_tps,
            "analysis_tokens_per_s": analysis_tps, "seconds": result.seconds,
            "pass_ratio": encode_s / result.seconds["pass"], "ratio": analysis_tps / encode_tps}


# -- steering ---------------------------------------------------------------------------
def bench_steering(lm: LoadedModel, sae: SparseAutoencoder, layer: int, steers: Sequence[Steer],
                   max_activations: Mapping[int, float], *, prompt: str, tokens: int = 128,
                   repeats: int = 5) -> dict[str, Any]:
    """Decode tokens/s of ``generate`` unsteered vs steered by ``steers`` at ``layer``:
    greedy, exactly ``tokens`` new tokens each (prompt prefill included in the time),
    one discarded warm-up of each, then ``repeats`` alternating runs; medians."""
    lm.check_layer(layer)
    if repeats < 1:
        raise ValueError(f"--repeats must be positive (got {repeats})")
    edit = steering_edit(sae, steers, max_activations)
    prompt_ids = chat_prompt_ids(lm, prompt)
    sampling = Sampling(temperature=0.0, max_tokens=tokens)

    def run(steer: bool) -> tuple[float, str]:
        pieces = generate(lm, layer, edit if steer else None, prompt_ids, sampling,
                          ignore_eos=True)
        return _timed(lambda: "".join(pieces))

    times: dict[bool, list[float]] = {False: [], True: []}
    texts: dict[bool, str] = {}
    for index in range(repeats + 1):
        for steer in (False, True):
            seconds, texts[steer] = run(steer)
            if index:
                times[steer].append(seconds)
    plain_tps = tokens / statistics.median(times[False])
    steered_tps = tokens / statistics.median(times[True])
    return {"bench": "steering", "model": lm.name, "layer": layer,
            "n": sae.cfg.n_latents, "steers": len(steers), "prompt_tokens": len(prompt_ids),
            "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "device": str(lm.device), "text_changed": texts[True] != texts[False],
            "unsteered_tokens_per_s": plain_tps, "steered_tokens_per_s": steered_tps,
            "ratio": steered_tps / plain_tps}
