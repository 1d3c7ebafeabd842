"""Capture on the tiny random Llama: layout, early stop equivalence, resume, bad input."""

import errno
import json
from pathlib import Path

import pytest
import torch

from training.data import capture as capture_module
from training.data.activations import ActivationError, ActivationStore, Manifest, read_shard
from training.data.capture import CaptureConfig, CaptureError, capture, capture_layers
from training.data.corpus import CorpusError
from training.data.models import ModelLoadError


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path


def _cfg(text_file, **kw) -> CaptureConfig:
    base = {"layer": 1, "tokens": 600, "dataset": str(text_file), "context": 32,
            "dtype": "fp32", "batch_contexts": 4, "shard_rows": 31 * 5}
    return CaptureConfig(**{**base, **kw})


def test_capture_layout_matches_hidden_states(tiny_model, text_file, tmp_path):
    out = tmp_path / "acts"
    manifest = capture(tiny_model, _cfg(text_file), out, progress=False)
    assert manifest.rows >= 600 and manifest.rows % 31 == 0
    assert manifest.shards[:-1] == [155] * (len(manifest.shards) - 1)
    assert not (tmp_path / ".acts.partial").exists()
    store = ActivationStore(out)
    tokens = store.tokens()
    assert tokens.shape == (manifest.contexts, 32) and (tokens[:, 0] == 1).all()
    # Row r is context r // 31, position r % 31 + 1 of hidden_states[layer + 1].
    ids = tokens[:3].long()
    with torch.no_grad():
        hidden = tiny_model.model(ids, output_hidden_states=True).hidden_states[2]
    first = next(store.iter_sequential(93))
    torch.testing.assert_close(first, hidden[:, 1:].reshape(-1, 64), atol=1e-5, rtol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["layer"] == 1


def test_capture_fp16_and_shuffled_reading(tiny_model, text_file, tmp_path):
    out = tmp_path / "acts16"
    capture(tiny_model, _cfg(text_file, dtype="fp16"), out, progress=False)
    store = ActivationStore(out)
    assert store.shard(0).dtype == torch.float16
    seen = torch.cat(list(store.iter_shuffled(31, seed=3, epochs=1)))
    everything = torch.cat(list(store.iter_sequential(1000))).float()
    assert seen.shape == everything.shape
    assert not torch.equal(seen, everything)  # shuffled
    assert torch.equal(seen.sum(0), everything.sum(0)) or torch.allclose(
        seen.sum(0), everything.sum(0), atol=1e-2)
    again = torch.cat(list(store.iter_shuffled(31, seed=3, epochs=1)))
    assert torch.equal(seen, again)  # deterministic in the seed


def test_rerun_reuses_and_different_settings_refuse(tiny_model, text_file, tmp_path):
    out = tmp_path / "acts"
    first = capture(tiny_model, _cfg(text_file), out, progress=False)
    again = capture(tiny_model, _cfg(text_file), out, progress=False)
    assert again.rows == first.rows
    with pytest.raises(CaptureError, match="already holds a different capture"):
        capture(tiny_model, _cfg(text_file, layer=2), out, progress=False)


def test_interrupted_capture_resumes(tiny_model, text_file, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    reference = capture(tiny_model, _cfg(text_file), tmp_path / "ref", progress=False)
    real_write = capture_module._write_shard
    calls = {"n": 0}

    def write_then_interrupt(*args):
        real_write(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(capture_module, "_write_shard", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        capture(tiny_model, _cfg(text_file), out, progress=False)
    partial = tmp_path / ".acts.partial"
    # The second shard's file landed but the manifest was not updated: resume drops it.
    assert Manifest.load(partial).shards == [155] and not out.exists()
    assert (partial / "shard-00001.safetensors").exists()
    monkeypatch.setattr(capture_module, "_write_shard", real_write)
    resumed = capture(tiny_model, _cfg(text_file), out, progress=False)
    assert resumed.shards == reference.shards and not partial.exists()
    a = torch.cat(list(ActivationStore(out).iter_sequential(10_000)))
    b = torch.cat(list(ActivationStore(tmp_path / "ref").iter_sequential(10_000)))
    assert torch.equal(a, b)


def test_disk_full_leaves_nothing(tiny_model, text_file, tmp_path, monkeypatch):
    def no_space(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(capture_module, "_write_shard", no_space)
    with pytest.raises(CaptureError, match="disk full"):
        capture(tiny_model, _cfg(text_file), tmp_path / "acts", progress=False)
    assert list(tmp_path.iterdir()) == [text_file]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    ({"layer": 4}, ModelLoadError, "layer 4 is out of range"),
    ({"layer": -1}, ModelLoadError, "out of range"),
    ({"context": 1}, CaptureError, "--context must be at least 2"),
    ({"context": 1000}, CaptureError, "exceeds"),
    ({"tokens": 0}, CaptureError, "--tokens must be positive"),
    ({"dtype": "int8"}, ValueError, "unknown dtype"),
])
def test_bad_settings_fail_before_writing(tiny_model, text_file, tmp_path, kwargs, error,
                                          pattern):
    with pytest.raises(error, match=pattern):
        capture(tiny_model, _cfg(text_file, **kwargs), tmp_path / "acts", progress=False)
    assert not (tmp_path / "acts").exists() and not (tmp_path / ".acts.partial").exists()


def test_empty_dataset_is_named(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises((CorpusError, CaptureError), match="empty"):
        capture(tiny_model, _cfg(empty), tmp_path / "acts", progress=False)
    assert not (tmp_path / "acts").exists() and not (tmp_path / ".acts.partial").exists()


def test_corrupt_shard_is_named(tiny_model, text_file, tmp_path):
    out = tmp_path / "acts"
    capture(tiny_model, _cfg(text_file), out, progress=False)
    shard = out / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ActivationError, match="corrupt activation shard .*shard-00001"):
        read_shard(shard, 64)
    with pytest.raises(ActivationError, match="not an activation directory"):
        ActivationStore(tmp_path)


def test_dataset_that_runs_out_is_marked_and_reused(tiny_model, text_file, tmp_path):
    out = tmp_path / "acts"
    cfg = _cfg(text_file, tokens=10**6)
    first = capture(tiny_model, cfg, out, progress=False)
    assert first.exhausted and 0 < first.rows < 10**6
    again = capture(tiny_model, cfg, out, progress=False)
    assert again.rows == first.rows


def test_progress_callback_counts_rows_without_a_bar(tiny_model, text_file, tmp_path):
    """Jobs capture with the bar off and follow ``on_tokens``: it must still count."""
    calls: list[tuple[int, int]] = []
    manifest = capture(tiny_model, _cfg(text_file), tmp_path / "acts", progress=False,
                       on_tokens=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 2 and calls[0][0] > 0
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (min(manifest.rows, calls[-1][1]), calls[-1][1])


@pytest.mark.parametrize("stop, kept", [("interrupted", True), ("error", False)])
def test_an_interrupted_capture_leaves_its_partial_files(tiny_model, text_file, tmp_path,
                                                         stop, kept):
    """A progress callback raising ``Interrupted`` (a job another worker owns now) stops
    the capture without deleting the partial directory; any other error removes it."""
    from training.data.stop import Interrupted

    def callback(done: int, total: int) -> None:
        if done > 100:
            raise Interrupted() if stop == "interrupted" else RuntimeError("boom")

    with pytest.raises(Interrupted if stop == "interrupted" else RuntimeError):
        capture(tiny_model, _cfg(text_file), tmp_path / "acts", progress=False,
                on_tokens=callback)
    assert (tmp_path / ".acts.partial").exists() == kept


def _rows(folder: Path) -> torch.Tensor:
    return torch.cat(list(ActivationStore(folder).iter_sequential(10_000)))


def test_several_layers_from_one_forward_equal_single_captures(tiny_model, text_file,
                                                               tmp_path, monkeypatch):
    blocks_run: list[int] = []
    for index, block in enumerate(tiny_model.blocks):
        monkeypatch.setattr(block, "forward", _counting(block.forward, blocks_run, index))
    singles = {layer: capture(tiny_model, _cfg(text_file, layer=layer),
                              tmp_path / f"single-{layer}", progress=False)
               for layer in (0, 2)}
    forwards_alone = blocks_run.count(2)
    blocks_run.clear()
    outs = {0: tmp_path / "many" / "L0", 2: tmp_path / "many" / "L2"}
    manifests = capture_layers(tiny_model, _cfg(text_file), outs, progress=False)
    # one forward per batch for both layers, stopped after block 2
    assert blocks_run.count(0) == blocks_run.count(2) == forwards_alone > 0
    assert 3 not in blocks_run
    for layer, single in singles.items():
        assert manifests[layer].layer == layer and manifests[layer].shards == single.shards
        assert torch.equal(_rows(outs[layer]), _rows(tmp_path / f"single-{layer}"))
    assert capture_layers(tiny_model, _cfg(text_file), outs, progress=False)[2].rows == (
        manifests[2].rows)  # finished: reused


def _counting(forward, log: list, index: int):
    def counted(*args, **kwargs):
        log.append(index)
        return forward(*args, **kwargs)
    return counted


def test_layers_interrupted_between_their_shards_resume_together(tiny_model, text_file,
                                                                 tmp_path, monkeypatch):
    reference = capture(tiny_model, _cfg(text_file, layer=2), tmp_path / "ref", progress=False)
    real_write = capture_module._write_shard
    calls = {"n": 0}

    def write_then_interrupt(*args):
        real_write(*args)
        calls["n"] += 1
        if calls["n"] == 3:  # layer 0's second shard is written, layer 2's is not
            raise KeyboardInterrupt

    monkeypatch.setattr(capture_module, "_write_shard", write_then_interrupt)
    outs = {0: tmp_path / "L0", 2: tmp_path / "L2"}
    with pytest.raises(KeyboardInterrupt):
        capture_layers(tiny_model, _cfg(text_file), outs, progress=False)
    assert [len(Manifest.load(tmp_path / f".L{i}.partial").shards) for i in (0, 2)] == [1, 1]
    monkeypatch.setattr(capture_module, "_write_shard", real_write)
    resumed = capture_layers(tiny_model, _cfg(text_file), outs, progress=False)
    assert resumed[2].shards == reference.shards
    assert torch.equal(_rows(outs[2]), _rows(tmp_path / "ref"))
    with pytest.raises(ModelLoadError, match="layer 9 is out of range"):
        capture_layers(tiny_model, _cfg(text_file), {1: tmp_path / "a", 9: tmp_path / "b"})
