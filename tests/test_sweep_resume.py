"""Sweeps checkpoint and resume: a sweep from a capture stopped mid-run and resumed writes
the SAEs an uninterrupted sweep writes, bit for bit; a sweep from the model (one block or
several) resumed writes what resumed streaming runs of each member write; a resume of
another sweep or with other settings is refused, naming why, and loses nothing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.synthetic import sparse_rows, write_capture
from tests.test_stream import _cfg as stream_cfg
from tests.test_stream import _interrupted_at, _stream
from training.data.stop import Interrupted
from training.sae.autoencoder import SaeConfig
from training.sae.folder import load_sae
from training.train.run import TrainError, partial_dir
from training.train.stream import train_streaming
from training.train.sweep import train_sweep
from training.train.sweep_checkpoint import SWEEP_CHECKPOINT, checkpoint_path
from training.train.trainer import TrainConfig

D = 16
CONFIGS = {"n32-topk": SaeConfig(d_in=D, n_latents=32, k=4),
           "n64-batchtopk": SaeConfig(d_in=D, n_latents=64, k=4, architecture="batchtopk")}


class DiskFull(OSError):
    """A failure that is not an interruption: the checkpoint must survive it too."""


@pytest.fixture(scope="module")
def acts_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic") / "acts"
    write_capture(directory, sparse_rows(12_800, D))
    return directory


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch": 256, "tokens": 256 * 30, "warmup_steps": 5,
                          "init_rows": 1024, "holdout_rows": 1024, "checkpoint_every": 10,
                          "log_every": 5, "lr": 1e-2, **kw})


def _stop_at(step: int, error: type[BaseException] = Interrupted):
    def on_step(index: int, stats) -> None:
        if index == 1 and stats.step == step:
            raise error

    return on_step


def _same_folders(ours, theirs) -> None:
    mine, other = (load_file(str(ours / "sae.safetensors")),
                   load_file(str(theirs / "sae.safetensors")))
    assert mine.keys() == other.keys()
    for key in mine:
        assert torch.equal(mine[key], other[key]), key
    assert (ours / "loss_curve.csv").read_text() == (theirs / "loss_curve.csv").read_text()
    assert (ours / "cfg.json").read_text() == (theirs / "cfg.json").read_text()
    figures = [json.loads((folder / "metrics.json").read_text()) for folder in (ours, theirs)]
    for measured in figures:
        assert measured.pop("tokens_per_s") > 0  # a time, not a result
    assert figures[0] == figures[1]


def test_a_resumed_sweep_writes_the_saes_an_uninterrupted_one_does(acts_dir, tmp_path) -> None:
    whole = train_sweep(acts_dir, {tmp_path / "whole" / n: c for n, c in CONFIGS.items()},
                        _cfg(), progress=False)
    cut = {tmp_path / "cut" / name: sae_cfg for name, sae_cfg in CONFIGS.items()}
    with pytest.raises(DiskFull):
        train_sweep(acts_dir, cut, _cfg(), progress=False, on_step=_stop_at(25, DiskFull))
    assert checkpoint_path(list(cut)).name == SWEEP_CHECKPOINT
    assert checkpoint_path(list(cut)).is_file(), "a failure after a checkpoint keeps it"
    assert not any(out.exists() for out in cut)
    steps: list[int] = []
    resumed = train_sweep(acts_dir, cut, _cfg(), resume=True, progress=False,
                          on_step=lambda index, stats: steps.append(stats.step))
    assert steps == [step for step in range(21, 31) for _ in CONFIGS]
    for name, ours, theirs in zip(CONFIGS, resumed, whole, strict=True):
        _same_folders(tmp_path / "cut" / name, tmp_path / "whole" / name)
        assert ours["heldout_fvu"] == theirs["heldout_fvu"] and ours["steps"] == 30
    assert not list((tmp_path / "cut").glob(".*.partial"))


def test_a_resume_of_another_sweep_is_refused_and_loses_nothing(acts_dir, tmp_path) -> None:
    outs = {tmp_path / name: sae_cfg for name, sae_cfg in CONFIGS.items()}
    with pytest.raises(TrainError, match="nothing to resume: no sweep checkpoint"):
        train_sweep(acts_dir, outs, _cfg(), resume=True, progress=False)
    assert not list(tmp_path.iterdir()), "a refused resume makes nothing"
    with pytest.raises(Interrupted):
        train_sweep(acts_dir, outs, _cfg(), progress=False, on_step=_stop_at(12))
    saved = checkpoint_path(list(outs)).read_bytes()
    wider = {tmp_path / "extra": SaeConfig(d_in=D, n_latents=16, k=2), **outs}
    with pytest.raises(TrainError, match="the interrupted sweep's members: it trained"):
        train_sweep(acts_dir, wider, _cfg(), resume=True, progress=False)
    with pytest.raises(TrainError, match=r"--lr 0\.01 \(now 0\.02\)"):
        train_sweep(acts_dir, outs, _cfg(lr=2e-2), resume=True, progress=False)
    assert not partial_dir(tmp_path / "extra").exists()
    assert checkpoint_path(list(outs)).read_bytes() == saved
    results = train_sweep(acts_dir, outs, _cfg(), resume=True, progress=False)
    assert [m["steps"] for m in results] == [30, 30]
    checkpoint_path(list(outs)).parent.mkdir()
    checkpoint_path(list(outs)).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read the sweep checkpoint"):
        train_sweep(acts_dir, outs, _cfg(), resume=True, progress=False)


def test_an_interrupted_sweep_keeps_its_folders_and_a_fresh_one_says_what_it_discards(
        acts_dir, tmp_path, caplog) -> None:
    outs = {tmp_path / "family" / name: sae_cfg for name, sae_cfg in CONFIGS.items()}
    works = [partial_dir(out) for out in outs]
    with pytest.raises(Interrupted):  # a job handed to another worker: its folders now
        train_sweep(acts_dir, outs, _cfg(), progress=False, on_step=_stop_at(5))
    assert all(work.is_dir() for work in works) and not checkpoint_path(list(outs)).exists()
    with pytest.raises(TrainError, match="nothing to resume"):
        train_sweep(acts_dir, outs, _cfg(), resume=True, progress=False)
    with pytest.raises(Interrupted):
        train_sweep(acts_dir, outs, _cfg(), progress=False, on_step=_stop_at(15))
    assert checkpoint_path(list(outs)).is_file()
    with caplog.at_level(logging.WARNING):
        results = train_sweep(acts_dir, outs, _cfg(), progress=False)
    assert "starting afresh: the checkpoint in" in caplog.text
    assert [m["steps"] for m in results] == [30, 30]
    assert not any(work.exists() for work in works)


def test_a_checkpoint_of_another_source_or_width_is_refused(acts_dir, tiny_model, text_file,
                                                           tmp_path) -> None:
    from training.train.stream_sweep import train_streaming_sweep

    wide = tmp_path / "wide-acts"
    write_capture(wide, sparse_rows(12_800, 64))
    streamed = {tmp_path / "s" / n: SaeConfig(d_in=64, n_latents=64, k=4) for n in "ab"}
    with pytest.raises(Interrupted):
        train_streaming_sweep(tiny_model, streamed, _stream_cfg(), _stream(text_file),
                              progress=False, on_step=_stop_at(6))
    with pytest.raises(TrainError, match=r"of a sweep from the model \(no --acts\)"):
        train_sweep(wide, streamed, _cfg(), resume=True, progress=False)
    narrow = {tmp_path / "d" / name: sae_cfg for name, sae_cfg in CONFIGS.items()}
    with pytest.raises(Interrupted):
        train_sweep(acts_dir, narrow, _cfg(), progress=False, on_step=_stop_at(12))
    widened = {out: SaeConfig(d_in=64, n_latents=cfg.n_latents, k=4,
                              architecture=cfg.architecture) for out, cfg in narrow.items()}
    with pytest.raises(TrainError, match=r"activations of width 16 \(now 64\), --acts "):
        train_sweep(wide, widened, _cfg(), resume=True, progress=False)
    assert checkpoint_path(list(narrow)).is_file() and checkpoint_path(list(streamed)).is_file()


def _stream_cfg() -> TrainConfig:
    """A streaming run's settings, checkpointing every 4 steps (as ``_interrupted_at``)."""
    return stream_cfg(checkpoint_every=4)


def _resumed_alone(lm, text_file, tmp_path, out, sae_cfg, layer: int) -> dict:
    """A single streaming run of one member, stopped at step 6 and resumed."""
    cfg, out, sae_cfg = _interrupted_at(6, lm, text_file, tmp_path, out=out, sae_cfg=sae_cfg,
                                        layer=layer)
    return train_streaming(lm, out, sae_cfg, cfg, _stream(text_file, layer), resume=True,
                           progress=False)


def test_a_resumed_layer_sweep_writes_what_resumed_streaming_runs_do(tiny_model, text_file,
                                                                    tmp_path) -> None:
    from training.train.stream_sweep import train_layer_sweep

    layers = {3: {tmp_path / "deep": SaeConfig(d_in=64, n_latents=64, k=4)},
              1: {tmp_path / "a": SaeConfig(d_in=64, n_latents=64, k=4),
                  tmp_path / "b": SaeConfig(d_in=64, n_latents=128, k=8,
                                            architecture="batchtopk")}}
    with pytest.raises(Interrupted):
        train_layer_sweep(tiny_model, layers, _stream_cfg(), _stream(text_file),
                          progress=False, on_step=_stop_at(6))
    with pytest.raises(TrainError, match="--dataset"):
        train_layer_sweep(tiny_model, layers, _stream_cfg(), _stream(text_file.parent / "x"),
                          resume=True, progress=False)
    swept = train_layer_sweep(tiny_model, layers, _stream_cfg(), _stream(text_file),
                              resume=True, progress=False)
    members = [(layer, out, cfg) for layer, group in layers.items()
               for out, cfg in group.items()]
    for (layer, out, sae_cfg), metrics in zip(members, swept, strict=True):
        alone = _resumed_alone(tiny_model, text_file, tmp_path, tmp_path / f"alone-{out.name}",
                               sae_cfg, layer)
        assert metrics["heldout_fvu"] == alone["heldout_fvu"] and metrics["steps"] == 16
        ours, ours_cfg = load_sae(out)
        theirs, theirs_cfg = load_sae(tmp_path / f"alone-{out.name}")
        torch.testing.assert_close(ours.w_dec, theirs.w_dec, rtol=1e-5, atol=1e-6)
        assert ours_cfg["stream_contexts"] == theirs_cfg["stream_contexts"] > 0
        assert ours_cfg["hook_layer"] == layer
    assert not list(tmp_path.glob(".*.partial"))
