"""Training straight from the tiny random Llama (no capture on disk): the shuffle buffer
mixes and bounds, a run reaches a working SAE, an interrupted one resumes from its
checkpoint, and bad settings name their flag."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from training.data.capture import CaptureConfig
from training.data.stop import Interrupted
from training.sae.autoencoder import SaeConfig
from training.sae.folder import load_sae
from training.train.run import partial_dir
from training.train.stream import ShuffleBuffer, StreamConfig, train_streaming
from training.train.trainer import TrainConfig

runner = CliRunner()


def test_the_buffer_mixes_rows_and_serves_each_once() -> None:
    chunks = [torch.arange(i * 10, (i + 1) * 10).float().unsqueeze(1) for i in range(20)]
    served = list(ShuffleBuffer(iter(chunks), capacity=40, batch=8, seed=0))
    values = torch.cat(served).flatten()
    assert all(len(b) == 8 for b in served) and len(values) == 200
    assert sorted(values.tolist()) == list(range(200))  # every row exactly once
    first = served[0].flatten()
    assert first.max() - first.min() > 10, "a batch mixes rows of several chunks"
    with pytest.raises(ValueError, match="--buffer-rows"):
        ShuffleBuffer(iter(chunks), capacity=10, batch=8, seed=0)


def _stream(text_file, layer: int = 1) -> StreamConfig:
    return StreamConfig(CaptureConfig(layer=layer, tokens=1, dataset=str(text_file),
                                      context=32, dtype="fp32", batch_contexts=8),
                        buffer_rows=2048)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch": 256, "tokens": 256 * 16, "lr": 3e-3, "warmup_steps": 2,
                          "holdout_rows": 512, "checkpoint_every": 0, **kw})


def test_streaming_trains_an_sae_from_the_model(tiny_model, text_file, tmp_path) -> None:
    metrics = train_streaming(tiny_model, tmp_path / "sae", SaeConfig(d_in=64, n_latents=128,
                                                                      k=8),
                              _cfg(), _stream(text_file), progress=False)
    assert metrics["streamed"] and metrics["steps"] == 16 and metrics["heldout_rows"] == 512
    assert metrics["heldout_fvu"] < 0.5
    _, cfg = load_sae(tmp_path / "sae")
    assert cfg["streamed"] and cfg["hook_layer"] == 1 and cfg["activations"] is None
    assert not partial_dir(tmp_path / "sae").exists()


def _interrupted_at(step: int, lm, text_file, tmp_path, *, out=None, sae_cfg=None,
                    layer: int = 1):
    """A streamed run (checkpoint every 4 steps) of block ``layer`` stopped at ``step``:
    (cfg, out, sae_cfg); by default ``tmp_path/sae``, 128 latents, k = 8."""
    cfg, out = _cfg(checkpoint_every=4), out or tmp_path / "sae"
    sae_cfg = sae_cfg or SaeConfig(d_in=64, n_latents=128, k=8)

    def stop(stats) -> None:
        if stats.step == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_streaming(lm, out, sae_cfg, cfg, _stream(text_file, layer), progress=False,
                        on_step=stop)
    return cfg, out, sae_cfg


def test_an_interrupted_streaming_run_resumes(tiny_model, text_file, tmp_path) -> None:
    cfg, out, sae_cfg = _interrupted_at(6, tiny_model, text_file, tmp_path)
    assert (partial_dir(out) / "checkpoint.pt").is_file() and not out.exists()
    steps: list[int] = []
    metrics = train_streaming(tiny_model, out, sae_cfg, cfg, _stream(text_file), resume=True,
                              progress=False, on_step=lambda stats: steps.append(stats.step))
    assert steps == list(range(5, 17)) and metrics["steps"] == 16
    assert metrics["heldout_fvu"] < 0.6


def test_the_command_trains_from_a_model(tiny_llama_dir, text_file, tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    args = ["train", "--layer", "1", "--dataset", str(text_file), "--latents", "128", "--k",
            "8", "--batch", "256", "--buffer-rows", "2048", "--out", str(tmp_path / "sae")]
    result = runner.invoke(app, [*args, "--tokens", "2048"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["streamed"]
    missing = runner.invoke(app, args, env=env)
    assert missing.exit_code == 2 and "--tokens" in missing.output
    spread = runner.invoke(app, [*args, "--tokens", "2048", "--nproc", "2"], env=env)
    assert spread.exit_code == 2 and "--nproc" in spread.output


def test_the_command_trains_a_sweep_from_a_model(tiny_llama_dir, text_file, tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    args = ["train", "--layer", "1", "--dataset", str(text_file), "--latents", "64,128",
            "--k", "4,8", "--batch", "256", "--buffer-rows", "2048", "--tokens", "1024",
            "--out", str(tmp_path / "sweep")]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    members = json.loads(result.stdout.strip().splitlines()[-1])["sweep"]
    assert [m["name"] for m in members] == ["n64-k4-topk", "n64-k8-topk", "n128-k4-topk",
                                            "n128-k8-topk"]
    for member in members:
        _, cfg = load_sae(member["out"])
        assert cfg["streamed"] and cfg["d_sae"] == int(member["name"][1:].split("-")[0])
        assert member["streamed"] and member["sweep_size"] == 4 and member["steps"] == 4
    resumed = runner.invoke(app, [*args, "--resume"], env=env)
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output
    too_wide = runner.invoke(app, [*args[:-4], "--k", "4,64", "--tokens", "1024", "--out",
                                   str(tmp_path / "other")], env=env)
    assert too_wide.exit_code == 2 and "--k 64 is not below --latents 64" in too_wide.output
    for extra, flag in ((["--buffer-rows", "300"], "--buffer-rows"), (["--skip"], "--skip"),
                        (["--arch", "topk,relu"], "--arch")):
        bad = runner.invoke(app, [*args, *extra], env=env)
        assert bad.exit_code == 2 and flag in bad.output, bad.output


@pytest.mark.parametrize("b_dec_init", ["median", "mean"])
def test_a_streaming_sweep_trains_the_saes_streaming_runs_would(tiny_model, text_file,
                                                               tmp_path, b_dec_init) -> None:
    from training.train.stream_sweep import train_streaming_sweep

    configs = {"a": SaeConfig(d_in=64, n_latents=64, k=4),
               "b": SaeConfig(d_in=64, n_latents=128, k=8, architecture="batchtopk")}
    steps: list[int] = []
    cfg = _cfg(b_dec_init=b_dec_init)
    swept = train_streaming_sweep(tiny_model, {tmp_path / n: c for n, c in configs.items()},
                                  cfg, _stream(text_file), progress=False,
                                  on_step=lambda index, stats: steps.append(index))
    assert steps == [0, 1] * 16
    for (name, sae_cfg), metrics in zip(configs.items(), swept, strict=True):
        alone = train_streaming(tiny_model, tmp_path / f"alone-{name}", sae_cfg, cfg,
                                _stream(text_file), progress=False)
        assert metrics["heldout_fvu"] == alone["heldout_fvu"]
        assert metrics["sweep_size"] == 2 and metrics["heldout_rows"] == 512
        ours, ours_cfg = load_sae(tmp_path / name)
        theirs, theirs_cfg = load_sae(tmp_path / f"alone-{name}")
        torch.testing.assert_close(ours.w_dec, theirs.w_dec, rtol=1e-5, atol=1e-6)
        assert ours_cfg["stream_contexts"] == theirs_cfg["stream_contexts"] > 0
    assert not list(tmp_path.glob(".*.partial"))


def test_a_layer_sweep_trains_each_block_as_its_own_streaming_run_would(tiny_model, text_file,
                                                                       tmp_path) -> None:
    from training.train.stream_sweep import train_layer_sweep

    layers = {3: {tmp_path / "deep": SaeConfig(d_in=64, n_latents=64, k=4)},
              1: {tmp_path / "a": SaeConfig(d_in=64, n_latents=64, k=4),
                  tmp_path / "b": SaeConfig(d_in=64, n_latents=128, k=8)}}
    steps: list[int] = []
    swept = train_layer_sweep(tiny_model, layers, _cfg(), _stream(text_file), progress=False,
                              on_step=lambda index, stats: steps.append(index))
    assert steps == [0, 1, 2] * 16 and [m["sweep_size"] for m in swept] == [3] * 3
    outs = [(layer, out, sae_cfg) for layer, group in layers.items()
            for out, sae_cfg in group.items()]
    for (layer, out, sae_cfg), metrics in zip(outs, swept, strict=True):
        alone = train_streaming(tiny_model, tmp_path / f"alone-{out.name}", sae_cfg, _cfg(),
                                _stream(text_file, layer), progress=False)
        assert metrics["heldout_fvu"] == alone["heldout_fvu"]
        ours, ours_cfg = load_sae(out)
        theirs, theirs_cfg = load_sae(tmp_path / f"alone-{out.name}")
        assert torch.equal(ours.w_dec, theirs.w_dec) and ours_cfg["hook_layer"] == layer
        assert ours_cfg["stream_contexts"] == theirs_cfg["stream_contexts"]
    assert swept[0]["heldout_fvu"] != swept[1]["heldout_fvu"], "block 3 is not block 1"
    with pytest.raises(ValueError, match="same folder"):
        train_layer_sweep(tiny_model, {1: {tmp_path / "x": SaeConfig(d_in=64, n_latents=64,
                                                                     k=4)},
                                       2: {tmp_path / "x": SaeConfig(d_in=64, n_latents=64,
                                                                     k=4)}},
                          _cfg(), _stream(text_file), progress=False)


def test_the_fanout_gives_each_block_every_forward_in_order_and_bounds_its_queues() -> None:
    from training.train.stream_sweep import LayerFanout

    source = (({3: torch.full((2, 1), float(i)), 1: torch.full((2, 1), -float(i))}, i + 1)
              for i in range(50))
    fanout = LayerFanout(source, [3, 1])
    deep, shallow = fanout.reader(3), fanout.reader(1)
    longest = 0
    seen: dict[int, list] = {3: [], 1: []}
    for _ in range(50):
        for layer, reader in ((3, deep), (1, shallow)):
            rows, consumed = next(reader)
            seen[layer].append((float(rows[0, 0]), consumed))
            longest = max(longest, *(len(q) for q in fanout.queues.values()))
    assert seen[3] == [(float(i), i + 1) for i in range(50)]
    assert seen[1] == [(-float(i), i + 1) for i in range(50)]
    assert longest <= 1, "readers in step keep at most one forward waiting"
    assert next(deep, None) is None and next(shallow, None) is None


def test_bad_streaming_flags_are_refused_before_the_model_loads(text_file, tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"),
           "SAELAB_DEFAULT_MODEL": str(tmp_path / "no-such-model")}
    args = ["train", "--layer", "1,2", "--dataset", str(text_file), "--latents", "64,128",
            "--k", "4", "--batch", "256", "--tokens", "1024", "--out", str(tmp_path / "o")]
    for extra, flag in ((["--buffer-rows", "300"], "--buffer-rows"),
                        (["--k", "4,64"], "--k 64"), (["--skip"], "--skip"),
                        (["--arch", "relu"], "--arch")):
        bad = runner.invoke(app, [*args, *extra], env=env)
        assert bad.exit_code == 2 and flag in bad.output, bad.output
        assert "no-such-model" not in bad.output
    unloadable = runner.invoke(app, args, env=env)
    assert unloadable.exit_code == 2 and "no-such-model" in unloadable.output


def test_the_command_trains_several_layers_from_one_stream(tiny_llama_dir, text_file,
                                                           tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    args = ["train", "--dataset", str(text_file), "--batch", "256", "--buffer-rows", "1024",
            "--tokens", "1024"]
    one_each = runner.invoke(app, [*args, "--layer", "1,3", "--latents", "64", "--k", "4",
                                   "--out", str(tmp_path / "one")], env=env)
    assert one_each.exit_code == 0, one_each.output
    members = json.loads(one_each.stdout.strip().splitlines()[-1])["sweep"]
    assert [m["name"] for m in members] == ["L1", "L3"]
    assert [load_sae(tmp_path / "one" / f"L{i}")[1]["hook_layer"] for i in (1, 3)] == [1, 3]
    family = runner.invoke(app, [*args, "--layer", "2,1", "--latents", "64", "--k", "4,8",
                                 "--out", str(tmp_path / "family")], env=env)
    assert family.exit_code == 0, family.output
    names = [m["name"] for m in json.loads(family.stdout.strip().splitlines()[-1])["sweep"]]
    assert names == ["L2/n64-k4-topk", "L2/n64-k8-topk", "L1/n64-k4-topk", "L1/n64-k8-topk"]
    assert all((tmp_path / "family" / name / "cfg.json").is_file() for name in names)
    for extra, message in ((["--layer", "1,1"], "--layer"), (["--layer", "1,9"], "layer 9"),
                           (["--layer", "1,2", "--resume"], "nothing to resume")):
        bad = runner.invoke(app, [*args, *extra, "--latents", "64", "--k", "4", "--out",
                                  str(tmp_path / "bad")], env=env)
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "bad").exists()


def test_a_failed_or_interrupted_streaming_sweep_keeps_the_family_it_replaces(
        tiny_model, text_file, tmp_path, monkeypatch) -> None:
    import training.train.run as run_module
    from training.train.stream_sweep import train_streaming_sweep

    outs = {tmp_path / "a": SaeConfig(d_in=64, n_latents=64, k=4),
            tmp_path / "b": SaeConfig(d_in=64, n_latents=128, k=4)}
    short = _cfg(tokens=256 * 4)
    train_streaming_sweep(tiny_model, outs, short, _stream(text_file), progress=False)
    before = {out: load_sae(out)[0].w_dec.clone() for out in outs}

    def stop(index: int, stats) -> None:
        if index == 1 and stats.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_streaming_sweep(tiny_model, outs, _cfg(tokens=256 * 4, seed=1),
                              _stream(text_file), progress=False, on_step=stop)
    saved = run_module.save_sae

    def full_disk_on_the_second(directory, *args, **kwargs) -> None:
        if "b.partial" in str(directory):
            raise OSError(28, "No space left on device")
        saved(directory, *args, **kwargs)

    monkeypatch.setattr(run_module, "save_sae", full_disk_on_the_second)
    with pytest.raises(OSError, match="No space"):
        train_streaming_sweep(tiny_model, outs, _cfg(tokens=256 * 4, seed=1),
                              _stream(text_file), progress=False)
    for out, w_dec in before.items():
        assert torch.equal(load_sae(out)[0].w_dec, w_dec), "no member of a failed sweep"
    assert not list(tmp_path.glob(".*.partial"))


def test_a_streaming_sweep_that_runs_out_leaves_nothing(tiny_model, tmp_path) -> None:
    from training.train.stream_sweep import train_streaming_sweep

    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"Line {i} is short." for i in range(300)))
    outs = {tmp_path / "a": SaeConfig(d_in=64, n_latents=64, k=4),
            tmp_path / "family" / "L1" / "b": SaeConfig(d_in=64, n_latents=128, k=4)}
    with pytest.raises(ValueError, match="ran out .* lower --tokens"):
        train_streaming_sweep(tiny_model, outs, _cfg(holdout_rows=64, tokens=256 * 64),
                              _stream(short), progress=False)
    assert not list(tmp_path.glob(".*.partial")) and not (tmp_path / "a").exists()
    assert not (tmp_path / "family").exists(), "the folders it made for its members go too"
    with pytest.raises(ValueError, match="d_in=32"):
        train_streaming_sweep(tiny_model, {tmp_path / "c": SaeConfig(d_in=32, n_latents=64,
                                                                     k=4)},
                              _cfg(), _stream(short), progress=False)


def test_bench_stream_compares_with_capture_then_train(tiny_llama_dir, tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    result = runner.invoke(app, ["bench", "stream", "--layer", "1", "--tokens", "2048",
                                 "--latents", "128", "--k", "8", "--batch", "256",
                                 "--buffer-rows", "1024"], env=env)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["streaming_s"] > 0 and figures["capture_then_train_s"] > figures["capture_s"]
    assert 0 < figures["heldout_fvu_stream"] < 2 and 0 < figures["heldout_fvu_disk"] < 2


def test_bench_sweep_from_the_model_times_it_against_streaming_runs(tiny_llama_dir,
                                                                   tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    args = ["bench", "sweep", "--latents", "64,128", "--k", "8", "--tokens", "1024",
            "--batch", "256", "--buffer-rows", "1024"]
    result = runner.invoke(app, [*args, "--layer", "1,2"], env=env)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["streamed"] and figures["saes"] == ["L1/n64-k8-topk", "L1/n128-k8-topk",
                                                       "L2/n64-k8-topk", "L2/n128-k8-topk"]
    assert figures["sweep_s"] > 0 and figures["separate_s"] > 0
    assert figures["max_fvu_difference"] < 1e-6
    neither = runner.invoke(app, args, env=env)
    assert neither.exit_code == 2 and "--acts" in neither.output and "--layer" in neither.output


def test_a_resume_with_other_settings_names_the_flag(tiny_model, text_file, tmp_path) -> None:
    cfg, out, sae_cfg = _interrupted_at(5, tiny_model, text_file, tmp_path)
    with pytest.raises(ValueError, match="--layer 1 .now 2."):
        train_streaming(tiny_model, out, sae_cfg, cfg, _stream(text_file, 2), resume=True,
                        progress=False)
    with pytest.raises(ValueError, match="--latents 128 .now 256."):
        train_streaming(tiny_model, out, SaeConfig(d_in=64, n_latents=256, k=8), cfg,
                        _stream(text_file), resume=True, progress=False)
    assert (partial_dir(out) / "checkpoint.pt").is_file(), "a refused resume keeps the run"


def test_a_streamed_sae_is_evaluated_after_the_text_it_read(tiny_llama_dir, text_file,
                                                           tmp_path) -> None:
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DEFAULT_MODEL": str(
        tiny_llama_dir)}
    trained = runner.invoke(app, ["train", "--layer", "1", "--dataset", str(text_file),
                                  "--latents", "128", "--k", "8", "--batch", "256",
                                  "--buffer-rows", "1024", "--tokens", "1024", "--out",
                                  str(tmp_path / "sae")], env=env)
    assert trained.exit_code == 0, trained.output
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["stream_contexts"] > 0
    evaluated = runner.invoke(app, ["eval", "--sae", str(tmp_path / "sae"), "--dataset",
                                    str(text_file), "--tokens", "512"], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["tokens"] >= 512
