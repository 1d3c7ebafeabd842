"""Recorded clean passes on the tiny random Llama: an evaluation that reads one gives the
figures of one that runs the model (every figure bit for bit but the KL, which the record's
mean unembedding gives to float rounding), for any SAE of that block, and a record is
never read for other weights, text, block, batching or code, nor when it is damaged; a
record that cannot be written never fails the evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.tiny_eval import tiny_batches as _batches
from tests.tiny_eval import tiny_sae as _sae
from training.evaluation import losses as eval_losses
from training.evaluation import metrics, record_key, records
from training.evaluation.record_key import record_key as key_of
from training.evaluation.records import CleanRecords

KL_REL = 2e-5
"""How far the KL from a record's mean unembedding may be from the KL of the clean
log-probabilities: float32 rounding of terms that are each ~40× the KL."""


def _assert_same_figures(got: metrics.EvalMetrics, expected: metrics.EvalMetrics) -> None:
    for name, value in expected.to_dict().items():
        if name == "kl":
            assert got.kl == pytest.approx(value, rel=KL_REL), name
        else:
            assert getattr(got, name) == value, name


@pytest.mark.parametrize("site", ["resid", "mlp"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_a_recorded_clean_pass_gives_the_figures_of_a_fresh_one(tiny_model, tmp_path, layer,
                                                                 site, monkeypatch) -> None:
    """Recorded with one SAE, read for another: at every block (the last one included)
    and both sites, with chunks that split a context."""
    monkeypatch.setattr(eval_losses, "LOSS_CHUNK", 17)
    kept = CleanRecords(tmp_path / "records")
    first, second = _sae(site, seed=1), _sae(site, seed=2, n=256)
    recording = metrics.evaluate(tiny_model, first, layer, _batches(), progress=False,
                                 records=kept)
    assert kept.outcome == "written"
    assert recording.to_dict() == metrics.evaluate(tiny_model, first, layer, _batches(),
                                                   progress=False).to_dict()
    for sae in (first, second):
        read = metrics.evaluate(tiny_model, sae, layer, _batches(), progress=False,
                                records=kept)
        assert kept.outcome == "read"
        _assert_same_figures(read, metrics.evaluate(tiny_model, sae, layer, _batches(),
                                                    progress=False))
    assert read.kl > 0 and read.ce_sae != read.ce_clean
    assert len([p for p in kept.root.iterdir() if not p.name.startswith(".")]) == 1


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_a_family_reads_the_record_too(tiny_model, tmp_path, site) -> None:
    family = [_sae(site, seed=3), _sae(site, seed=4, n=256)]
    kept = CleanRecords(tmp_path)
    metrics.evaluate(tiny_model, family[0], 1, _batches(), progress=False, records=kept)
    together = metrics.evaluate_family(tiny_model, family, 1, _batches(), progress=False,
                                       records=kept)
    assert kept.outcome == "read"
    for got, sae in zip(together, family, strict=True):
        _assert_same_figures(got, metrics.evaluate(tiny_model, sae, 1, _batches(),
                                                   progress=False))


def test_a_bf16_model_is_not_recorded(tiny_llama_dir, data_dir, tmp_path) -> None:
    """A bf16 model rounds its logits after the head, which a record's KL cannot see: its
    evaluations run fresh every time, with the figures they have without records."""
    from training.data.models import load_model

    bf16 = load_model(str(tiny_llama_dir), data_dir=data_dir, device="cpu",
                      dtype=torch.bfloat16)
    kept, sae = CleanRecords(tmp_path), _sae(seed=5)
    for _ in range(2):
        got = metrics.evaluate(bf16, sae, 2, _batches(), progress=False, records=kept)
        assert kept.outcome.startswith("not recorded: the model is not in float32")
    assert got.to_dict() == metrics.evaluate(bf16, sae, 2, _batches(),
                                             progress=False).to_dict()
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_other_weights_text_block_or_batching_get_their_own_record(tiny_model, tmp_path
                                                                   ) -> None:
    kept, sae = CleanRecords(tmp_path), _sae()

    def outcome(batches, layer: int = 1) -> str:
        metrics.evaluate(tiny_model, sae, layer, batches, progress=False, records=kept)
        return kept.outcome

    assert outcome(_batches()) == "written"
    assert outcome(_batches()) == "read"
    assert outcome(_batches(seed=9)) == "written"  # other text
    assert outcome(_batches(), layer=2) == "written"  # another block
    assert outcome([torch.cat(_batches())]) == "written"  # the same text in one batch
    weight = tiny_model.blocks[0].mlp.up_proj.weight
    saved = weight.clone()
    try:
        with torch.no_grad():
            weight[0, 0] += 1e-3  # one weight edited in place, before block 1
        assert outcome(_batches()) == "written"
        assert outcome(_batches()) == "read"
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert outcome(_batches()) == "read"  # the first record again
    data = tiny_model.blocks[0].mlp.up_proj.weight.data  # an edit no version counter sees
    try:
        data.mul_(3)
        assert outcome(_batches()) == "written"
    finally:
        data.copy_(saved)
    assert outcome(_batches()) == "read"
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 6


def test_another_version_of_the_evaluation_code_reads_no_record(tiny_model, monkeypatch
                                                                ) -> None:
    key = key_of(tiny_model, 1, "resid", _batches())
    monkeypatch.setattr(record_key, "code_digest", lambda: "another saelab")
    assert key_of(tiny_model, 1, "resid", _batches()) != key


def test_a_damaged_record_is_removed_and_the_pass_run_again(tiny_model, tmp_path, caplog
                                                           ) -> None:
    kept, sae = CleanRecords(tmp_path), _sae()
    expected = metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    shard = folder / "batch-00001.safetensors"
    flipped = bytearray(shard.read_bytes())
    flipped[-5] ^= 0x10  # one bit of a tensor's data
    for damage in (lambda: shard.write_bytes(shard.read_bytes()[:1000]),  # truncated
                   lambda: shard.write_bytes(bytes(flipped)),
                   lambda: (folder / "record.json").write_text("[]"),
                   lambda: (folder / "record.json").write_text("{not json")):
        damage()
        caplog.clear()
        again = metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False,
                                 records=kept)
        assert kept.outcome == "written" and "damaged" in caplog.text
        assert again.to_dict() == expected.to_dict()
    assert metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False,
                            records=kept) and kept.outcome == "read"


def test_a_folder_a_killed_removal_left_is_replaced(tiny_model, tmp_path) -> None:
    """A record's folder without its record.json (a removal killed halfway) neither
    blocks its name nor reads as a record."""
    kept, sae = CleanRecords(tmp_path), _sae()
    key = key_of(tiny_model, 1, "resid", _batches())
    (tmp_path / key).mkdir(parents=True)
    (tmp_path / key / "batch-00000.safetensors").write_bytes(b"left over")
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    assert kept.outcome == "written" and (tmp_path / key / "record.json").is_file()
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    assert kept.outcome == "read"


def test_a_record_of_other_ids_is_never_read(tiny_model, tmp_path) -> None:
    """Even under this evaluation's name (a collision, or a file put there by hand), a
    record whose token ids differ from the batches is refused and removed."""
    kept, sae = CleanRecords(tmp_path), _sae()
    metrics.evaluate(tiny_model, sae, 1, _batches(seed=4), progress=False, records=kept)
    (other,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    key = key_of(tiny_model, 1, "resid", _batches())
    other.rename(tmp_path / key)
    assert kept.read(key, _batches(), "resid", tiny_model.device) is None
    assert not (tmp_path / key).exists()


def test_records_stay_within_their_bound(tiny_model, tmp_path) -> None:
    sae = _sae()
    size = records.record_bytes(_batches(), "resid", 64)
    kept = CleanRecords(tmp_path, max_bytes=int(size * 2.5))
    for seed in range(3):
        metrics.evaluate(tiny_model, sae, 1, _batches(seed), progress=False, records=kept)
        assert kept.outcome == "written"
    names = {p.name for p in tmp_path.iterdir()}
    assert key_of(tiny_model, 1, "resid", _batches(0)) not in names  # oldest
    assert key_of(tiny_model, 1, "resid", _batches(2)) in names
    small = CleanRecords(tmp_path / "small", max_bytes=size)  # a record over half of it
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=small)
    assert small.outcome.startswith("not recorded") and "over half" in small.outcome
    assert not small.root.exists()


FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from training.data.models import load_model
    from training.evaluation import metrics
    from training.evaluation.records import CleanRecords
    from training.sae.autoencoder import SaeConfig, SparseAutoencoder

    lm = load_model(sys.argv[1], data_dir=Path(sys.argv[2]), device="cpu")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 512, (3, 40), generator=generator) for _ in range(2)]
    for ids in batches:
        ids[:, 0] = 1
    fresh = metrics.evaluate(lm, sae, 1, batches, progress=False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))
    kept = CleanRecords(Path(sys.argv[3]))
    got = metrics.evaluate(lm, sae, 1, batches, progress=False, records=kept)
    print(json.dumps({"outcome": kept.outcome, "same": got.to_dict() == fresh.to_dict()}))
""")


def test_a_record_that_cannot_be_written_never_fails_the_evaluation(tiny_llama_dir, data_dir,
                                                                    tmp_path) -> None:
    """Files limited to 20 kB, a fifth of a batch's (the kernel refuses the rest of the
    write, as a full disk does): the figures come back whole and nothing half-written
    stays."""
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tiny_llama_dir),
                          str(data_dir), str(tmp_path / "records"), "20000"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["same"] and result["outcome"].startswith("not recorded")
    assert "File too large" in result["outcome"], result["outcome"]
    assert list((tmp_path / "records").iterdir()) == []


def test_an_evaluation_that_fails_leaves_no_record(tiny_model, tmp_path, monkeypatch) -> None:
    sae, calls = _sae(), []
    encode = sae.encode

    def fail_on_the_second_batch(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return encode(x)

    monkeypatch.setattr(sae, "encode", fail_on_the_second_batch)
    kept = CleanRecords(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    assert list(tmp_path.iterdir()) == []


def test_models_or_hooks_a_record_cannot_serve(tiny_model, tmp_path, monkeypatch) -> None:
    kept, sae = CleanRecords(tmp_path), _sae()
    handle = tiny_model.blocks[3].register_forward_hook(lambda _m, _i, out: out)
    try:
        metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    finally:
        handle.remove()
    assert kept.outcome == "not recorded: the model carries hooks"
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept,
                     share_prefix=False)
    assert kept.outcome.startswith("not recorded: the model's forward after block L")
    monkeypatch.setattr(tiny_model.model.config, "model_type", "granite", raising=False)
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    assert kept.outcome.startswith("not recorded")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_the_kl_from_the_mean_unembedding_is_the_kl(monkeypatch) -> None:
    """KL(p ‖ q) = logsumexp(z_q) − logsumexp(z_p) − ū·(u_q − u_p) for logits z = W_U u,
    on random logits far from each other, chunks splitting the contexts."""
    torch.manual_seed(2)
    monkeypatch.setattr(eval_losses, "LOSS_CHUNK", 4)
    unembed = torch.randn(300, 16)
    states, clean_states = torch.randn(3, 9, 16), torch.randn(3, 9, 16) * 0.5
    clean, spliced = clean_states @ unembed.T, states @ unembed.T
    ids = torch.randint(0, 300, (3, 10))
    _ce_clean, ce_sae, kl = eval_losses.pair_losses(clean, spliced, ids)
    terms = eval_losses.clean_kl_terms(clean, ids, unembed)
    got_ce, got_kl = eval_losses.recorded_losses(spliced, states, ids, clean_states, *terms)
    assert got_ce == ce_sae and kl > 1
    assert got_kl == pytest.approx(kl, rel=1e-5)


def test_a_record_removed_while_it_is_read_still_serves_that_reader(tiny_model, tmp_path
                                                                    ) -> None:
    """Another process's eviction may remove a record between its check and its reading:
    the files checked are mapped, so the reader still gets the whole batch."""
    kept, sae = CleanRecords(tmp_path), _sae()
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False, records=kept)
    key = key_of(tiny_model, 1, "resid", _batches())
    opened = kept.read(key, _batches(), "resid", tiny_model.device)
    fresh = [f.load() for f in kept.read(key, _batches(), "resid", tiny_model.device)]
    shutil.rmtree(tmp_path / key)
    for got, expected in zip((f.load() for f in opened), fresh, strict=True):
        assert torch.equal(got.inputs["hidden"], expected.inputs["hidden"])
        assert torch.equal(got.mean_unembed, expected.mean_unembed)
        assert (got.ce_clean, got.ce_ablate) == (expected.ce_clean, expected.ce_ablate)


@pytest.mark.slow
def test_the_embedded_models_record(embedded_model, embedded_sae, tmp_path) -> None:
    """SmolLM2 and a trained SAE of its block 3: read from the record, the KL is within a
    relative 1e-5 of the fresh evaluation's and every other figure is the same."""
    from training.sae.folder import load_sae

    sae, _cfg = load_sae(embedded_sae["sae"])
    batches = list(metrics.dataset_batches(embedded_model, "embedded", tokens=2 * 4 * 127,
                                           context=128, batch=4, skip_contexts=200))
    kept = CleanRecords(tmp_path)
    fresh = metrics.evaluate(embedded_model, sae, 3, batches, progress=False, records=kept)
    read = metrics.evaluate(embedded_model, sae, 3, batches, progress=False, records=kept)
    assert kept.outcome == "read" and 0 < read.kl < 5 and read.ce_loss_recovered > 0.5
    for name, value in fresh.to_dict().items():
        assert getattr(read, name) == pytest.approx(value, rel=1e-5 if name == "kl" else 0)
