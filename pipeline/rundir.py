"""The run folder: what `runs/<name>/` holds, and when a run or a fold in it may be reused.

    runs/<name>/              named by `RunDir`:
        config.yaml   the resolved config (every fold asked for so far)
        tune.json     the post-processing rule tune chose (pipeline/postprocess.py)
        oof.csv       the tuned OOF masks as RLE, scoreable with `tgs score`
        test_probs.npy, test_ids.txt   the test probabilities averaged over folds, and their ids
        predict.json  written last by predict: names the two above by digest (pipeline/manifests.py)
        blend.json    a blend's members, weights and data (pipeline/blend.py): written first, marked
                      unfinished, and again last; `blend_command` below turns it back into the command
        log.txt       what every command run on it printed (pipeline/runlog.py)
        wall.json     the wall time of `pipeline all` from nothing (the leaderboard's minutes)
        show/         the pictures and index.html (pipeline/show.py)
    runs/<name>/fold<k>/      one fold, named by `FoldDir`:
        best.pt       weights of the epoch with the best validation competition score
        last.pt       model + optimizer + scheduler + loop state: enough to resume
        prev.pt       the last.pt before it (fallback when last.pt is found damaged)
        stage1.pt     the resume state at the switch to the stage-2 loss (run.keep_stage1)
        snapshot<c>.pt  the best epoch of lr cycle c (train.snapshots)
        log.csv       LOG_COLUMNS, one row per epoch
        oof.npy       float16 validation probabilities (101x101) of the fold's final model(s)
        oof_ids.txt   their ids, one per line, in the same order
        done.json     written last: the fold is complete (its training digest, its files' sha256,
                      the train data's content fingerprint)
        test_probs.npy     the fold's own test prediction (float16, `all`: predicted in the fold's
        test_predict.json  process as it finishes), named by digest in test_predict.json with the
                           done.json and test set it was made from; `predict` averages these

A fold is reused only if it was trained with the same `training_digest`: the hash of every
config key that decides the trained weights (pipeline/config.py: its rules and Config.digest's
are one table there). No torch here: tune, show and the leaderboard
read run folders without it.

Whether a stage's output is finished, whole and current (done.json, tune.json, predict.json) is
pipeline/manifests.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

from pipeline import fileio
# training_digest and is_training_key are config.py's, beside Config.digest: one set of rules for
# what a digest leaves out; the run folder's reuse decisions name them from here.
from pipeline.config import Config, dump_yaml, flatten, is_training_key, load_config, save_config, training_digest
from pipeline.errors import PipelineError

# The run folder's file names (RunDir below); the stages name them through RunDir or these.
CONFIG_FILE = "config.yaml"
TUNE_FILE = "tune.json"
OOF_CSV = "oof.csv"
PROBS_FILE = "test_probs.npy"
IDS_FILE = "test_ids.txt"
PREDICT_FILE = "predict.json"
FOLD_PREDICT_FILE = "test_predict.json"  # a fold's own test prediction's manifest (FoldDir.test_predict)
DATA_FILE = "data.json"  # {"name": .., "fingerprint": ..}: the data the run was tuned on (leaderboard)
# A blend's run folder (pipeline/blend.py) holds this file: its members, weights and search;
# the leaderboard lists the members from it.
BLEND_FILE = "blend.json"
RUN_LOG_FILE = "log.txt"
WALL_FILE = "wall.json"  # {"minutes": .., "config_digest": ..}: the wall time of `pipeline all`
SHOW_DIR = "show"
OOF_FILES = ("oof.npy", "oof_ids.txt")  # each fold's, beside its done.json (FoldDir)
# One table of every run under the working directory, not inside any run (pipeline/leaderboard.py)
LEADERBOARD_CSV = "submissions/leaderboard.csv"
RUNS_PAGE = "index.html"  # <runs dir>/index.html: every run ranked (pipeline/leaderboardpage.py)

# val_score is that of the weights validated (the EMA when train.ema_decay is on); val_score_raw
# the raw weights' when they differ (empty otherwise).
LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_score", "val_score_raw", "seconds"]


# ---------------------------------------------------------------- one fold's files


@dataclass(frozen=True)
class FoldDir:
    """`runs/<name>/fold<k>/` and the names of what a fold writes there."""

    path: Path
    fold: int

    @classmethod
    def of(cls, run: Config | str | Path, fold: int) -> "FoldDir":
        """Fold `fold` of a run: a Config (its run_dir) or the run folder itself."""
        run_dir = run.run_dir if isinstance(run, Config) else Path(run)
        return cls(run_dir / f"fold{fold}", fold)

    best = property(lambda self: self.path / "best.pt")
    last = property(lambda self: self.path / "last.pt")
    prev = property(lambda self: self.path / "prev.pt")
    stage1 = property(lambda self: self.path / "stage1.pt")
    oof = property(lambda self: self.path / OOF_FILES[0])
    oof_ids = property(lambda self: self.path / OOF_FILES[1])
    done = property(lambda self: self.path / "done.json")
    log = property(lambda self: self.path / "log.csv")
    lock = property(lambda self: self.path / "train.lock")
    train_out = property(lambda self: self.path / "train.out")  # a --parallel-folds worker's output
    pseudo = property(lambda self: self.path / "pseudo.npz")  # pipeline/pseudo.py's label cache
    branched_from = property(lambda self: self.path / "branched_from.json")
    test_probs = property(lambda self: self.path / PROBS_FILE)  # pipeline/predict.py's predict_fold_test
    test_predict = property(lambda self: self.path / FOLD_PREDICT_FILE)  # its manifest (manifests.py)

    def snapshot(self, cycle: int) -> Path:
        return self.path / f"snapshot{cycle}.pt"

    def snapshots(self) -> list[Path]:
        """The cycle snapshots kept so far, in cycle order."""
        return sorted(self.path.glob("snapshot*.pt"), key=lambda p: int(p.stem.removeprefix("snapshot")))

    def training_files(self) -> list[Path]:
        """What a fold started afresh must not find from an earlier training; done.json first, so
        a kill part-way through the removal never leaves a "finished" fold without its files."""
        return [self.done, self.best, self.last, self.prev, self.stage1, self.oof, self.oof_ids, self.log,
                *self.snapshots()]


@dataclass(frozen=True)
class RunDir:
    """`runs/<name>/` and the names of what the stages write there."""

    path: Path

    def __post_init__(self):  # RunDir("runs/x") as well as RunDir(Path("runs/x"))
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, run: "Config | str | Path | RunDir") -> "RunDir":
        """A Config's run folder (its run_dir), or the folder itself."""
        if isinstance(run, RunDir):
            return run
        return cls(run.run_dir if isinstance(run, Config) else Path(run))

    config = property(lambda self: self.path / CONFIG_FILE)
    tune = property(lambda self: self.path / TUNE_FILE)
    oof_csv = property(lambda self: self.path / OOF_CSV)
    probs = property(lambda self: self.path / PROBS_FILE)
    ids = property(lambda self: self.path / IDS_FILE)
    predict = property(lambda self: self.path / PREDICT_FILE)
    blend = property(lambda self: self.path / BLEND_FILE)
    log = property(lambda self: self.path / RUN_LOG_FILE)
    wall = property(lambda self: self.path / WALL_FILE)
    data = property(lambda self: self.path / DATA_FILE)
    show = property(lambda self: self.path / SHOW_DIR)
    show_page = property(lambda self: self.path / SHOW_DIR / "index.html")

    def fold(self, fold: int) -> FoldDir:
        return FoldDir.of(self.path, fold)


def load_run_config(run_dir: str | Path) -> Config:
    """A run's resolved config, pointed at where the run dir is now (it may have been moved)."""
    run = Path(run_dir)
    path = RunDir(run).config
    if not path.exists():
        # a blend killed before its first write leaves such a folder too: its own command remakes it
        raise PipelineError(f"{path}: missing — is {run} a run dir made by `python -m pipeline train` "
                            "(or by `blend`: a blend stopped before it wrote anything is made by running it again)?")
    cfg = load_config(path)
    cfg.runs_dir, cfg.name = str(run.parent), run.name
    return cfg


def read_done(cfg: Config, fold: int) -> dict:
    return fileio.read_json(FoldDir.of(cfg, fold).done)


# ---------------------------------------------------------------- the command that (re)makes a run
# A refusal names the command that fixes it: these are those commands, for the run as it is named
# now (a hint must work when run as printed, from where the user stands).


def train_command(run: str | Path, *flags: str) -> str:
    """`python -m pipeline train` of the run in `run`, from its own config.yaml; the run's folder
    and name are given too when that config places the run elsewhere (a moved or copied run)."""
    run = Path(run)
    command = f"python -m pipeline train --config {quote(str(RunDir(run).config))}"
    try:
        placed = Path(load_config(RunDir(run).config).run_dir)
    except PipelineError:
        placed = run
    if placed.resolve() != run.resolve():
        command += f" --set runs_dir={quote(str(run.parent))} --set name={quote(run.name)}"
    return " ".join([command, *flags])


def read_blend_manifest(run: str | Path) -> dict | None:
    """The run's blend.json (pipeline/blend.py), {} when it cannot be read, None when the run is
    no blend. `finished: false` marks a blend still being (or killed while being) written."""
    path = RunDir(run).blend
    if not path.is_file():
        return None
    try:
        return fileio.read_json(path)  # a JSON object, or PipelineError
    except PipelineError:
        return {}


def blend_members(blend: dict | None) -> list[str]:
    """The member runs a blend.json (read_blend_manifest) lists, in its order; none when it lists
    none readable."""
    listed = (blend or {}).get("members")
    return [str(m["run"]) for m in (listed if isinstance(listed, list) else []) if isinstance(m, dict) and m.get("run")]


def blend_command(run: str | Path, blend: dict | None = None) -> str:
    """The `python -m pipeline blend` that makes the blend run `run` whole: the members, weights and
    data its blend.json records (written before anything else of the blend, so a blend killed
    part-way names it too). It remakes only what is not current; with an unreadable blend.json
    the members are unknown and the command says where they go (and forces the remake)."""
    run = Path(run)
    blend = read_blend_manifest(run) if blend is None else blend
    members = [quote(member) for member in blend_members(blend)]
    parts = ["python -m pipeline blend --runs", " ".join(members) or "RUN_A RUN_B", f"--name {quote(run.name)}",
             f"--runs-dir {quote(str(run.parent))}"]
    weights = str((blend or {}).get("weights_requested") or "auto")
    if weights.strip().lower() != "auto":
        parts.append(f"--weights {quote(weights)}")
    if (blend or {}).get("data"):
        parts.append(f"--data {quote(str(blend['data']))}")
    if not members:
        parts.append("--force")
    return " ".join(parts)


def remake_command(run: str | Path, *train_flags: str) -> str:
    """What makes the run's folds again: its blend command for a blend run, else `train_command`."""
    return blend_command(run) if RunDir(run).blend.is_file() else train_command(run, *train_flags)


# ---------------------------------------------------------------- the run


def prepare_run_dir(cfg: Config, *, force: bool) -> None:
    """Create runs/<name>/ with config.yaml; refuse to reuse a run made with another config.

    A run trained fold by fold (`train --folds 0`, later `train --folds 1`) is one experiment:
    the saved config lists every fold asked for so far, so `tune` and `predict` see them all."""
    path = RunDir.of(cfg).config
    saved = cfg
    if path.exists() and not force:
        previous = load_config(path)
        if training_digest(previous) != training_digest(cfg):
            old, new = flatten(previous), flatten(cfg)
            changed = [k for k in new if old.get(k) != new[k] and is_training_key(k)]
            raise PipelineError(
                f"{path}: this run was made with a different config (differs in {', '.join(changed[:5])}); "
                "use another name, or --force to retrain"
            )
        saved = dataclasses.replace(cfg, folds=merged_folds(previous, cfg))
        if dump_yaml(previous) == dump_yaml(saved):
            return
    save_config(saved, path)


def merged_folds(previous: Config, requested: Config) -> list[int]:
    """The folds of a run asked for before and now ([] = all of them)."""
    folds = sorted(set(previous.fold_list()) | set(requested.fold_list()))
    return [] if folds == list(range(requested.n_folds)) else folds


# ---------------------------------------------------------------- log.csv


def write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())


def read_log(path: Path) -> list[dict]:
    """log.csv's rows ([] when there is none yet); each row's epoch is checked to be an integer,
    since resuming and branching keep the rows up to an epoch."""
    if not os.path.lexists(path):
        return []
    text = fileio.read_text(path)  # a folder, permissions, not UTF-8: one line naming it
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise PipelineError(f"{path}: malformed CSV ({exc})") from None
    for line, row in enumerate(rows, start=2):
        if not str(row.get("epoch") or "").strip().isdigit():
            raise PipelineError(f"{path}: line {line} has epoch {row.get('epoch')!r}, expected a whole number "
                                "(a damaged training log: delete it, and training resumes without its earlier rows)")
    return rows
