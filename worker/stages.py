"""The stages of a job, each one call into the engine plus reporting and persisting.

Every stage is idempotent, so a job that lost its worker can simply run again: a finished
capture (or SAE) in the job's directory is reused, an interrupted capture resumes from its
last shard and an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from app.jobs import JobParams
from app.settings import Settings
from worker.runtime import SERIES_POINTS, JobRun, StepRate


def load_model(params: JobParams, settings: Settings):
    from training.data.models import load_model as load

    spec = params.model or settings.default_model
    logging.getLogger(__name__).info("loading the model %s", spec)
    return load(spec, data_dir=settings.data_dir)


def load_sae_model(params: JobParams, settings: Settings, sae_cfg: dict):
    """The job's model, else the one the SAE's cfg names (an imported SAE, a sweep's)."""
    model = params.model or sae_cfg.get("model_name")
    return load_model(JobParams(**{**params.model_dump(), "model": model}), settings)


def capture_stage(run: JobRun, params: JobParams, settings: Settings, directory: Path
                  ) -> str:
    """Capture ``params.tokens`` activations of ``params.layer``; returns the directory."""
    from training.data.capture import CaptureConfig, capture

    lm = load_model(params, settings)
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        run.progress(done, total, tokens_per_s=done / max(time.monotonic() - started, 1e-9))

    out = directory / "acts"
    capture(lm, CaptureConfig(layer=params.layer, tokens=params.tokens,
                              dataset=params.dataset, context=params.context,
                              site=params.site), out, progress=False, on_tokens=report)
    return str(out)


def train_spec(params: JobParams, acts: str, out: Path, resume: bool) -> dict:
    from training.data.activations import Manifest

    manifest = Manifest.load(Path(acts))
    arch = params.arch_for(manifest.site)
    return {"acts": acts, "out": str(out), "resume": resume,
            "sae": {"d_in": manifest.d_model, "n_latents": params.latents,
                    "k": params.k, "architecture": arch, "site": manifest.site,
                    "skip": params.skip, "matryoshka_widths": params.matryoshka or []},
            "train": {"batch": params.batch, "tokens": params.train_tokens, "lr": params.lr,
                      "checkpoint_every": params.checkpoint_every}}


def train_stage(run: JobRun, params: JobParams, acts: str, directory: Path) -> str:
    """Train an SAE on ``acts`` into ``<directory>/sae``, resuming a checkpoint if one is
    there; returns the SAE directory."""
    from training.train.run import CHECKPOINT, partial_dir

    out = directory / "sae"
    if (out / "cfg.json").is_file():
        return str(out)
    resume = (partial_dir(out) / CHECKPOINT).is_file()
    spec = train_spec(params, acts, out, resume)
    total = _total_steps(spec)
    every = max(1, total // SERIES_POINTS)
    rate = StepRate(params.batch)

    def on_step(stats) -> None:
        run.point(every, step=stats.step, tokens=stats.tokens, fvu=stats.fvu,
                  auxk=stats.auxk, l0=stats.l0, dead_fraction=stats.dead_fraction)
        run.progress(stats.step, total, **rate.figures(stats.step), loss=stats.fvu,
                     l0=stats.l0)

    if params.nproc == 1:
        from training.train.launch import run_spec

        run_spec(spec, progress=False, on_step=on_step)
    else:
        _train_distributed(run, spec, params.nproc, directory, on_step)
    return str(out)


def _total_steps(spec: dict) -> int:
    from training.data.activations import ActivationStore
    from training.train.trainer import TrainConfig

    cfg = TrainConfig.from_dict(spec["train"])
    rows = len(ActivationStore(Path(spec["acts"])))
    return max(1, (cfg.tokens or rows - min(cfg.holdout_rows, rows // 10)) // cfg.batch)


def _train_distributed(run: JobRun, spec: dict, nproc: int, directory: Path,
                       on_step) -> None:
    """torchrun with ``nproc`` processes; follows rank 0's step file (reading only what is
    new), and stops torchrun on every way out: cancel, a lost job, any error."""
    spec_path, result_path = directory / "train-spec.json", directory / "train-result.json"
    steps_path = directory / "train-steps.jsonl"
    steps_path.unlink(missing_ok=True)
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "progress_file": str(steps_path)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "training.train.launch", str(spec_path),
               str(result_path)]
    stderr_path = directory / "train-stderr.log"  # a file, not a pipe: a full pipe blocks
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=_die_with_parent)
        try:
            _follow_steps(proc, steps_path, on_step)
        finally:
            _stop(proc)
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if "error" in result:
        raise ValueError(result["error"])
    if proc.returncode != 0 or not result:
        tail = stderr_path.read_text()[-2000:].strip()
        raise RuntimeError(f"distributed training (nproc {nproc}) failed: {tail}")


def _follow_steps(proc: subprocess.Popen, steps_path: Path, on_step) -> None:
    """Report each line rank 0 appends to the step file until torchrun ends (a partial
    last line waits for its newline)."""
    from training.train.trainer import StepStats

    offset, pending = 0, ""
    while True:
        running = proc.poll() is None
        if steps_path.exists():
            with steps_path.open() as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                if line.strip():
                    on_step(StepStats(**json.loads(line)))
        if not running:
            return
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun (and so its ranks) if it still runs: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def evaluate_stage(lm, saes: dict[Path, object], store, tokens: int, settings: Settings
                   ) -> None:
    """CE loss recovered, KL, FVU ... of each SAE (by folder) spliced in, on the text that
    follows its capture (text the SAE was not trained on), saved as each folder's
    ``eval.json``. Several SAEs of one capture (a sweep's) share each batch's clean pass,
    and later evaluations of that text at that block read it from the settings' records."""
    from app.store.persist import EVAL_FILE
    from training.evaluation.metrics import evaluate_family_on_dataset
    from training.evaluation.records import CleanRecords

    manifest = store.manifest
    metrics = evaluate_family_on_dataset(lm, list(saes.values()), manifest.layer,
                                         dataset=manifest.dataset, tokens=tokens,
                                         context=manifest.context,
                                         skip_contexts=manifest.contexts, progress=False,
                                         records=CleanRecords(settings.eval_records_dir,
                                                              settings.eval_records_bytes)
                                         if settings.eval_records_bytes else None)
    for sae_dir, figures in zip(saes, metrics, strict=True):
        tmp = Path(sae_dir) / f".{EVAL_FILE}.tmp"  # whole or absent: a resume trusts it
        tmp.write_text(json.dumps(figures.to_dict(), indent=2))
        os.replace(tmp, Path(sae_dir) / EVAL_FILE)


def _die_with_parent() -> None:
    """Run in the child before exec: ask Linux to send it SIGTERM when the worker dies, even
    by SIGKILL, so torchrun stops its ranks instead of training on as orphans (the job is
    resumed from its checkpoint by the next worker)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def analyze_stage(run: JobRun, params: JobParams, settings: Settings, sae_dir: str,
                  acts: str | None, directory: Path | None = None, *,
                  evaluate: bool = True, lm=None) -> int:
    """Analyse every latent of the SAE and persist it; returns the SAE's store id. Without
    a capture (an imported SAE) the job's dataset is captured first, at the SAE's layer.
    ``evaluate=False``: its ``eval.json`` is written already (a sweep evaluates its SAEs
    together); ``lm``: the SAE's model, loaded already (a sweep's members share one)."""
    from app.store.persist import save_analysis, token_texts
    from training.analysis.latents import analyse_capture, checked_capture
    from training.sae.folder import load_sae

    sae, cfg = load_sae(Path(sae_dir))
    if cfg.get("hook_layer") is None and params.layer is not None:
        cfg["hook_layer"] = params.layer
    if cfg.get("hook_layer") is None:
        raise ValueError(f"sae: {sae_dir} does not say which layer it reads: give layer")
    if lm is None:
        lm = load_sae_model(params, settings, cfg)
    source = acts or cfg.get("activations")
    if not source:
        if directory is None:
            raise ValueError(f"sae: {sae_dir} does not name its capture; give acts")
        source = _capture_for_analysis(run, params, lm, int(cfg["hook_layer"]), directory,
                                       sae.cfg.site)
    store = checked_capture(sae, lm.name, lm.d_model, Path(source),
                            sae_label=f"sae: {sae_dir}", acts_label="acts:")
    started = time.monotonic()

    def report(done: int, total: int) -> None:
        run.progress(done, total, tokens_per_s=done / max(time.monotonic() - started, 1e-9))

    result = analyse_capture(sae.to(lm.device), store, lm.model.get_output_embeddings().weight,
                             max_tokens=params.analyze_tokens, progress=False, on_chunk=report)
    if params.eval_tokens and evaluate:
        run.update(force=True, message="evaluating the SAE spliced into the model")
        evaluate_stage(lm, {Path(sae_dir): sae}, store, params.eval_tokens, settings)
    run.update(force=True, message=f"saving {sae.cfg.n_latents} latents to the store")
    sae_id = save_analysis(run.sessions, sae_dir=Path(sae_dir), sae_cfg=cfg,
                           model_name=lm.name, d_model=lm.d_model, n_layers=lm.n_layers,
                           result=result, token_text=token_texts(lm.tokenizer, result))
    if params.feature_map:
        map_stage(run, sae, sae_id)
    return sae_id


def map_stage(run: JobRun, sae, sae_id: int) -> None:
    """Lay the latents out in 2-D from their decoder directions, for the feature map."""
    from app.store.persist import save_feature_map
    from training.analysis.feature_map import decoder_map

    run.update(force=True, message=f"laying out the feature map of {sae.cfg.n_latents} "
                                   "latents")
    save_feature_map(run.sessions, sae_id, decoder_map(sae.w_dec))


def _capture_for_analysis(run: JobRun, params: JobParams, lm, layer: int,
                          directory: Path, site: str = "resid") -> str:
    """``params.analyze_tokens`` activations of ``params.dataset`` at ``layer`` (at its MLP
    for a transcoder), into the job's directory (reused when the job resumes)."""
    from training.data.capture import CaptureConfig, capture

    run.update(force=True, message=f"capturing {params.dataset} at layer {layer} to analyse")
    out = directory / "acts"
    capture(lm, CaptureConfig(layer=layer, tokens=params.analyze_tokens,
                              dataset=params.dataset, context=params.context, site=site),
            out, progress=False)
    return str(out)
