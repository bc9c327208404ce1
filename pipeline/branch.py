"""Branch a run from another run's end of stage 1: stage-2 variants without training stage 1 again.

cpu_best spends 49 of its 88 epochs on BCE before the Lovasz stage, and most of what is worth
trying at this budget changes only the Lovasz stage (its hinge, its BCE share, ...). A run
trained with `run.keep_stage1: true` keeps each fold's resume checkpoint at the switch
(`fold<k>/stage1.pt`); `pipeline branch --from runs/A --config CFG --set ...` starts a new run
whose folds resume from those checkpoints, so every stage-2 variant costs only its stage 2.

Every epoch is seeded from (seed, fold, epoch) and a resumed fold ends with the weights of one
never interrupted (pipeline/train_fold.py), so a branched run is the run its config would have
trained from nothing, bit for bit on the same machine and thread count. That is why the two
configs must agree on every training key except the few that act only from the switch on.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import fileio
from pipeline.config import Config, flatten, load_config
from pipeline.errors import PipelineError
from pipeline.rundir import FoldDir, RunDir, is_training_key, prepare_run_dir, read_log, training_digest, write_log

# Keys that shape only the stage-2 loss when stage 1 is plain BCE.
STAGE2_LOSS_KEYS = ("loss.stage2_name", "loss.lovasz_hinge", "loss.symmetric_lovasz", "loss.bce_weight",
                    "loss.lovasz_weight")


def stage2_only_keys(source: Config, branch: Config) -> set[str]:
    """The training keys the branch may change: those with no effect before the switch."""
    free = {"loss.stage2_name"}
    if source.loss.name == "bce" and branch.loss.name == "bce":
        free |= set(STAGE2_LOSS_KEYS)
    switch = source.loss.stage2_from_epoch
    # validation changes nothing in stage 1 if neither run validates there (validate_from is 1-based)
    if source.train.validate_from > switch and branch.train.validate_from > switch:
        free.add("train.validate_from")
    return free


def stage1_differences(source: Config, branch: Config) -> list[str]:
    """Training keys on which the two configs differ before the switch (must be none)."""
    old, new = flatten(source), flatten(branch)
    free = stage2_only_keys(source, branch)
    return [k for k in new if is_training_key(k) and k not in free and old.get(k) != new[k]]


def branch_run(cfg: Config, source_dir: str | Path) -> list[Path]:
    """Start run `cfg` from `source_dir`'s stage-1 checkpoints; returns the folds' last.pt.

    Writes cfg's run dir (config.yaml) and, per fold, last.pt (the source's stage1.pt under
    cfg's config digest) and log.csv (the source's rows up to the switch). Training the run
    (`pipeline train` / `all` with the same config) then resumes from there."""
    from pipeline.checkpoints import load_checkpoint, save_checkpoint

    source_dir = Path(source_dir)
    source = load_config(RunDir(source_dir).config)
    if source.loss.stage2_from_epoch <= 0:
        raise PipelineError(f"{source_dir}: its config has no stage 2 (loss.stage2_from_epoch), nothing to branch")
    differing = stage1_differences(source, cfg)
    if differing:
        raise PipelineError(f"{source_dir}: stage 1 differs from this config in {', '.join(differing[:5])}; "
                            "a branch may change only what acts after loss.stage2_from_epoch")
    if cfg.run_dir.resolve() == source_dir.resolve():
        raise PipelineError(f"{source_dir}: a branch needs a run name of its own (--set name=...)")
    folders = [FoldDir.of(cfg, k) for k in cfg.fold_list()]
    started = [d.path for d in folders if d.last.exists() or d.done.exists()]
    if started:
        raise PipelineError(f"{started[0]}: already has training state; branch into a new run name")
    sources = [FoldDir.of(source_dir, k) for k in cfg.fold_list()]
    stage1 = [d.stage1 for d in sources]
    missing = [p for p in stage1 if not p.exists()]
    if missing:
        raise PipelineError(f"{missing[0]}: not found; train the source run with run.keep_stage1: true")

    # every checkpoint is checked before anything is written: a refused branch leaves no run behind
    checkpoints = [load_checkpoint(src) for src in stage1]
    for src, checkpoint in zip(stage1, checkpoints):
        epochs_done = int(checkpoint["state"]["epoch"])
        if epochs_done != source.loss.stage2_from_epoch:
            raise PipelineError(f"{src}: holds epoch {epochs_done}, not the switch at "
                                f"{source.loss.stage2_from_epoch}")
        if int(checkpoint["state"]["best_epoch"]) >= 0:
            # its best.pt and OOF of that epoch were not kept beside stage1.pt
            raise PipelineError(f"{src}: the source validated during stage 1; branching needs runs that "
                                "validate only after loss.stage2_from_epoch (train.validate_from)")

    prepare_run_dir(cfg, force=False)
    digest = training_digest(cfg)
    written = []
    switch = source.loss.stage2_from_epoch  # the epoch every checkpoint holds (checked above)
    for src, dst, checkpoint in zip(sources, folders, checkpoints):
        dst.path.mkdir(parents=True, exist_ok=True)
        checkpoint["config_digest"] = digest  # its train data and split stay the source's: on others it starts afresh
        save_checkpoint(dst.last, checkpoint)
        rows = [row for row in read_log(src.log) if int(row["epoch"]) <= switch]
        write_log(dst.log, rows)
        fileio.write_json(dst.branched_from, {"source": str(source_dir), "epoch": switch})
        written.append(dst.last)
    return written
