"""The sweep job's stages: every combination of sizes, k and architectures trained from one
read of the capture (``training.train.sweep``), then each SAE analysed into the store, so
their pages show the family's L0–FVU frontier."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from app.job_params import JobParams
from app.settings import Settings
from worker.runtime import JobRun, StepRate


def sweep_members(params: JobParams, acts: str, directory: Path) -> dict[str, dict]:
    """{member name: SaeConfig fields} of the job, each member's folder being
    ``<directory>/sweep/<name>`` (``n4096-k16-topk``, ...)."""
    from training.data.activations import Manifest
    from training.sae.autoencoder import SaeConfig
    from training.train.sweep import sweep_configs

    manifest = Manifest.load(Path(acts))
    base = SaeConfig(d_in=manifest.d_model, n_latents=max(params.sweep_latents or [2]),
                     k=min(params.sweep_k or [1]), site=manifest.site,
                     architecture="batchtopk" if manifest.site == "mlp" else "topk")
    configs = sweep_configs(base, params.sweep_latents or [], params.sweep_k or [],
                            params.sweep_arch or [params.arch_for(manifest.site)],
                            params.matryoshka or ())
    return {name: cfg.to_dict() for name, cfg in configs.items()}


def sweep_stage(run: JobRun, params: JobParams, acts: str, directory: Path) -> dict[str, str]:
    """Train the sweep into ``<directory>/sweep``; returns {member name: SAE folder}. A
    resumed job continues from the sweep's checkpoint, if it reached one, and skips the
    training when every folder is there."""
    from training.sae.autoencoder import SaeConfig
    from training.train.sweep import train_sweep
    from training.train.sweep_checkpoint import checkpoint_path
    from training.train.trainer import TrainConfig

    members = {name: directory / "sweep" / name
               for name in sweep_members(params, acts, directory)}
    if all((out / "cfg.json").is_file() for out in members.values()):
        return {name: str(out) for name, out in members.items()}
    configs = {members[name]: SaeConfig.from_dict(cfg)
               for name, cfg in sweep_members(params, acts, directory).items()}
    cfg = TrainConfig(batch=params.batch, tokens=params.train_tokens, lr=params.lr,
                      checkpoint_every=params.checkpoint_every)
    count, total, rate = len(configs), [0], StepRate(cfg.batch)

    def on_step(index: int, stats) -> None:
        if index == count - 1:  # every member has taken this step
            total[0] = total[0] or _steps(acts, cfg)
            run.progress(stats.step, total[0], **rate.figures(stats.step), loss=stats.fvu,
                         l0=stats.l0)

    run.update(force=True, message=f"training {count} SAEs from one read of {acts}")
    resume = checkpoint_path(list(configs)).is_file()
    train_sweep(Path(acts), configs, cfg, resume=resume, progress=False, on_step=on_step)
    return {name: str(out) for name, out in members.items()}


def _steps(acts: str, cfg) -> int:
    from training.data.activations import ActivationStore

    rows = len(ActivationStore(Path(acts)))
    return max(1, (cfg.tokens or rows - min(cfg.holdout_rows, rows // 10)) // cfg.batch)


def analyze_members(run: JobRun, params: JobParams, settings: Settings, result: dict,
                    directory: Path) -> dict[str, int]:
    """Analyse each member of ``result["saes"]`` into the store; ``result["sae_ids"]``
    ({name: SAE id}) grows, and is written to the job's row, as each finishes, so a resumed
    job skips those."""
    from worker.stages import analyze_stage, load_sae_model

    saes, acts = result["saes"], result.get("acts") or params.acts
    done = result.setdefault("sae_ids", {})
    todo = {name: sae_dir for name, sae_dir in saes.items() if name not in done}
    if not todo:
        return done
    # every member reads the same capture of the same model: load it once for all
    first_cfg = json.loads((Path(next(iter(todo.values()))) / "cfg.json").read_text())
    lm = load_sae_model(params, settings, first_cfg)
    if params.eval_tokens:
        evaluate_members(run, params, [Path(sae_dir) for sae_dir in todo.values()], acts, lm,
                         settings)
    for number, (name, sae_dir) in enumerate(saes.items(), start=1):
        if name in done:
            continue
        run.update(force=True, message=f"analysing {name} ({number} of {len(saes)})")
        done[name] = analyze_stage(run, params, settings, sae_dir, acts, directory,
                                   evaluate=False, lm=lm)
        run.update(force=True, result=dict(result))
    return done


def evaluate_members(run: JobRun, params: JobParams, folders: list[Path], acts: str,
                     lm, settings: Settings) -> None:
    """Evaluate the sweep's SAEs in ``folders`` that have no ``eval.json`` yet together,
    on the same batches (one clean pass per batch for all, then each SAE's spliced pass),
    each into its folder's ``eval.json``. A folder's ``eval.json`` is this job's own: the
    sweep writes each folder afresh, so one that is there was written after it."""
    from app.store.persist import EVAL_FILE
    from training.data.activations import ActivationStore
    from training.sae.folder import load_sae
    from worker.stages import evaluate_stage

    todo = [folder for folder in folders if not (folder / EVAL_FILE).is_file()]
    if not todo:
        return
    logging.getLogger(__name__).info("evaluating %d SAEs together, on the same batches",
                                     len(todo))
    run.update(force=True, message=f"evaluating {len(todo)} SAEs spliced into the model, "
                                   "on the same batches")
    saes = {folder: load_sae(folder)[0].to(lm.device) for folder in todo}
    evaluate_stage(lm, saes, ActivationStore(Path(acts)), params.eval_tokens, settings)
