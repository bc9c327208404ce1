"""The typed experiment config: YAML file -> dataclasses, validated on load, saved with the run.

Layering (as in timm's train.py): dataclass defaults <- YAML file <- `--set key=value`
overrides. The resolved config is written to `runs/<name>/config.yaml`; that file alone
is enough to reproduce or resume the run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError, short_repr
from pipeline.registry import LOSSES, MODELS


@dataclass
class ModelConfig:
    # A name in pipeline/registry.py's MODELS: "seed_unet" or "unet_<timm encoder>" (unet_resnet34, ...)
    name: str = "seed_unet"
    n_filters: int = 16  # seed_unet width (the tutorial's start_neurons)
    dropout: float = 0.1
    # The tutorial's Keras blocks drop their first conv by mistake; True reproduces that.
    keras_bug: bool = False
    in_chans: int = 1
    pretrained: bool = False  # ImageNet encoder weights: from weights_path, else timm's download
    weights_path: str = ""  # a local timm weights file, or a folder holding one (offline machines)
    # Input normalisation inside the model (so checkpoints and predict agree): "imagenet" maps the
    # [0,1] image to the encoder's pretrained mean/std (timm's pretrained_cfg), what ImageNet
    # weights were trained on; "none" feeds [0,1] as before (docs/experiments.md: unmeasured).
    input_norm: str = "none"
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    scse: bool = False
    hypercolumn: bool = False
    # The centre's image-level mean, transformed, added to each of its pixels (blocks.GlobalContext).
    global_context: bool = False
    deep_supervision: bool = False
    # UNet blocks as h + conv(h) (h = the block's first conv): seed_unet's blocks, timm UNets' decoder.
    residual: bool = False


@dataclass
class InputConfig:
    # "pad": reflect-pad 101 -> size (winners' choice); "resize": bilinear resize to size.
    mode: str = "pad"
    size: int = 128


@dataclass
class AugmentConfig:
    hflip: float = 0.5
    shift_scale: float = 0.5  # probability of a small affine shift/scale
    shift_limit: float = 0.1
    scale_limit: float = 0.1
    # Degrees either way, drawn by the same affine: the beds stay roughly level, so only small
    # tilts keep a section plausible. 0 = the tutorial's affine, no rotation (docs/results.md).
    rotate_limit: float = 0.0
    brightness_contrast: float = 0.5
    brightness_limit: float = 0.1
    contrast_limit: float = 0.1


@dataclass
class LossConfig:
    # A name in pipeline/registry.py's LOSSES: "bce", "lovasz", "bce_lovasz" (bce_weight * BCE +
    # lovasz_weight * Lovasz), "dice" (soft Dice), ...
    name: str = "bce"
    bce_weight: float = 1.0
    lovasz_weight: float = 1.0
    # Schedule: from this epoch on (0-based) the loss switches to `stage2_name`.
    stage2_from_epoch: int = -1
    stage2_name: str = "lovasz"
    # Lovasz as (L(x, y) + L(-x, 1 - y)) / 2: background scored too (9th place: +0.02)
    symmetric_lovasz: bool = False
    # The hinge applied to the sorted errors: "relu" as published, or "elu" = elu(e) + 1, the
    # smooth hinge of popular TGS kernels: pixels already right by the margin still pull a
    # little (gradient exp(e) instead of 0), so the margins keep growing in the Lovasz stage.
    lovasz_hinge: str = "relu"
    # Score only the 101x101 image, not the reflect padding around it (input.mode pad): the
    # metric's IoU is over the image, and the padding repeats border salt in mirror.
    image_only: bool = False
    # Deep supervision weights (only when model.deep_supervision)
    empty_head_weight: float = 0.05
    stage_heads_weight: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    # "cosine_restarts" (snapshot cycles of cycle_epochs), "cosine", "plateau", "none"
    scheduler: str = "plateau"
    cycle_epochs: int = 10
    min_lr: float = 1e-5
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    early_stop_patience: int = 10  # epochs without a better val metric; 0 disables
    # "auto": bf16 on CPU when supported; on CUDA bf16 where native (Ampere+), else fp16 + GradScaler;
    # "off" (fp32, no TF32); "tf32" (fp32 with TF32 maths on CUDA); "bf16"; "fp16"
    precision: str = "auto"
    channels_last: str = "auto"  # "auto" | "on" | "off"
    limit_train: int = 0  # smoke runs: use only this many training images (0 = all)
    grad_clip: float = 0.0
    # Validate (and keep checkpoints by the metric) only from this epoch on (1-based; 0 = every
    # epoch): early epochs are never the best ones, and validation is ~13% of an epoch's time.
    validate_from: int = 0
    # cosine_restarts only: keep the best epoch of every cycle (snapshot{c}.pt); the fold's
    # OOF and test prediction become the average of its snapshots
    snapshots: bool = False
    # Exponential moving average of the weights (BatchNorm statistics included), updated after
    # every optimizer step: 0 = off; e.g. 0.995 averages over ~200 steps. When on, validation,
    # best.pt and so the OOF and the test predictions use the average; log.csv keeps the raw
    # weights' score beside it (val_score_raw), so every run is its own A/B.
    ema_decay: float = 0.0


@dataclass
class RunConfig:
    """Where and how fast a run goes, apart from the hyper-parameters: none of these keys
    changes the trained weights, so none enters the training digest (pipeline/rundir.py).
    A config that spells one under `train:` loads it as run.* (LEGACY_RUN_KEYS)."""

    threads: int = 0  # torch CPU threads; 0 = all cores
    num_workers: int = 0  # DataLoader worker processes
    # Train the folds as concurrent processes (pipeline/train_folds.py), as --parallel-folds
    # does (and as happens anyway on a machine with more than one GPU): on CUDA `fold_workers`
    # processes per GPU (0 = one; a 128x128 batch of 32 leaves an H100-class GPU mostly idle,
    # so 3 folds can share one), on CPU `fold_workers` processes sharing the cores (0 = one
    # per core); small convolutions scale badly across threads, so on few cores this trains faster.
    parallel_folds: bool = False
    fold_workers: int = 0
    # Keep each fold's resume checkpoint at the switch to the stage-2 loss (fold<k>/stage1.pt),
    # so `pipeline branch` can start stage-2 variants of this run without repeating stage 1.
    # Without a stage 1 (loss.stage2_from_epoch <= 0, as in smoke tests) nothing is kept.
    keep_stage1: bool = False
    # Write the resume checkpoint (last.pt, ~100-200 MB for a ResNet34 UNet, fsynced) at the end
    # of an epoch once this many seconds have passed since the last write, and always at the end
    # of each loss stage and of the fold: a kill loses at most this many seconds of training
    # (plus the epoch under way), which a resume trains again to the same weights. 0 = every epoch.
    checkpoint_seconds: float = 60.0
    # torch.compile the training step's model: "off", or a torch.compile mode ("default",
    # "reduce-overhead": CUDA graphs, which take the per-kernel launch cost off a fixed-shape
    # step; "max-autotune": also searches kernels, slow to build). Same weights up to float
    # rounding, so it is a run: key. Older configs spell it train.compile: true/false.
    compile: str = "off"
    # DDP only: SyncBatchNorm, i.e. BatchNorm statistics over the global batch, as one process
    # computes them (the weights the training digest names); false: per-process statistics over
    # batch_size / processes images (faster, another model). Older configs: train.sync_bn.
    sync_bn: bool = True
    # CUDA only: repeatable to the bit on the same GPU model and software (deterministic cuDNN
    # and torch kernels, fixed cuBLAS workspace; slower). Off, a GPU run repeats, and a resumed
    # run matches an uninterrupted one, only to within training noise (pipeline/runtime.py).
    # The CPU is exact either way.
    deterministic: bool = False
    # Also write per-epoch scalars (losses, lr, validation score) for TensorBoard under
    # runs/<name>/tensorboard/fold<k>/; needs the optional `tensorboard` package. Also spelt
    # train.tensorboard, like the other keys of this section.
    tensorboard: bool = False


# run: keys also accepted under train: (`train.threads` in a config or a --set is run.threads),
# so every saved config.yaml stays loadable.
LEGACY_RUN_KEYS = ("threads", "num_workers", "parallel_folds", "fold_workers", "keep_stage1", "tensorboard",
                   "compile", "sync_bn")
# run: keys a newer version dropped: an older run's config.yaml still loads (the value is unused)
RETIRED_RUN_KEYS = ("checkpoint_every",)  # epochs between last.pt writes: run.checkpoint_seconds now
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class PredictConfig:
    tta: list[str] = field(default_factory=lambda: ["none", "hflip"])
    batch_size: int = 64
    save_probs: bool = True


@dataclass
class PseudoConfig:
    # A finished, tuned run (its run dir, e.g. runs/v8) whose fold-k model labels the test
    # images that this run's fold k also trains on (pipeline/pseudo.py); "" = no pseudo-labels.
    teacher: str = ""
    # Keep a test image only if at most this share of its pixels has a teacher probability in
    # pseudo.UNCERTAIN_BAND (0.2-0.8): confident labels only. In [0, 1]. A mask's boundary is
    # uncertain by nature, so 0 keeps almost nothing (shares measured: docs/results.md).
    max_uncertain_share: float = 0.05


@dataclass
class TuneConfig:
    thresholds: list[float] = field(default_factory=lambda: [round(0.2 + 0.02 * i, 2) for i in range(31)])
    min_areas: list[int] = field(default_factory=lambda: [0, 10, 20, 30, 50, 75, 100, 150, 200])
    # "Is there salt at all?" may be decided at a stricter threshold than the one that draws the
    # mask: the mask (probs > threshold) is kept only if min_area pixels are > empty_threshold.
    # Each threshold is also searched with itself (the plain min-area rule), so tuning never does
    # worse; [] searches only that. In [0, 1).
    empty_thresholds: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9])


def default_folds_csv(data: str | Path, k: int, seed: int) -> Path:
    """The one rule for a folds file's path when none is given (`folds`, `train`, `all`): one
    split per dataset, k and seed, so two datasets or two k never share a file."""
    return Path("folds") / f"{Path(data).resolve().name}-k{k}-s{seed}.csv"


@dataclass
class Config:
    name: str = "experiment"
    data: str = "data/synth"
    # "" = folds/<data folder name>-k<n_folds>-s<seed>.csv, so two datasets never share a split
    folds_csv: str = ""
    runs_dir: str = "runs"
    n_folds: int = 5
    folds: list[int] = field(default_factory=list)  # which folds to train; empty = all
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def folds_path(self) -> Path:
        if self.folds_csv:
            return Path(self.folds_csv)
        return default_folds_csv(self.data, self.n_folds, self.seed)

    def fold_list(self) -> list[int]:
        return list(self.folds) if self.folds else list(range(self.n_folds))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, *, ignore: tuple[str, ...] = ("folds", "runs_dir")) -> str:
        """A short hash of the whole experiment: the weights and how they are predicted and tuned
        (tune.json, wall.json, the leaderboard's config_hash); see "Digests" below."""
        return experiment_digest(self, ignore)


# The choices of the keys whose code reads them in one place (the module named), spelt once here
# where config.py, torch-free, can check them; losses and models are pipeline/registry.py's.
INPUT_MODES = ("pad", "resize")  # pipeline/geometry.py
PRECISIONS = ("auto", "off", "tf32", "bf16", "fp16")  # pipeline/runtime.py
LOVASZ_HINGES = ("relu", "elu")  # pipeline/losses/lovasz.py
# pipeline/predict.py's TTA: the dims of an NCHW tensor each flips (each its own inverse)
TTA_FLIPS = {"none": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}
VALID_CHOICES = {
    "model.name": MODELS,
    "input.mode": INPUT_MODES,
    "model.input_norm": ("none", "imagenet"),
    "loss.name": LOSSES,
    "loss.stage2_name": LOSSES,
    "loss.lovasz_hinge": LOVASZ_HINGES,
    "train.optimizer": ("adam", "adamw", "sgd"),
    "train.scheduler": ("cosine_restarts", "cosine", "plateau", "none"),
    "train.precision": PRECISIONS,
    "train.channels_last": ("auto", "on", "off"),
    "run.compile": COMPILE_MODES,
}
VALID_TTA = tuple(TTA_FLIPS)


# ---------------------------------------------------------------- digests
# Two hashes of a config answer two questions:
#   training_digest: which weights a fold trains (done.json, checkpoints, reusing a fold, a
#     branch): the training keys only (is_training_key), flattened;
#   Config.digest (experiment_digest): which experiment, i.e. those weights and how they are
#     predicted and tuned: the whole config but where the run lives, nested.
# Their payloads were fixed by the runs already made, so they stay two functions; what each leaves
# out is the one table of rules below, so that a key added later keeps both digests of older runs.

# Keys (or whole sections) that change where and how fast a run goes or how it is evaluated,
# not the weights it trains.
NON_TRAINING_KEYS = ("name", "runs_dir", "folds", "predict", "tune", "run")
# Keys added after runs were made, at the value that reproduces what those runs did: left out of
# both digests at that value, so the older runs stay reusable and tuned. A new key goes here.
NEUTRAL_DEFAULTS = {"train.ema_decay": 0.0, "model.residual": False, "loss.image_only": False,
                    "model.global_context": False, "pseudo.teacher": "", "pseudo.max_uncertain_share": 0.05,
                    "augment.rotate_limit": 0.0, "loss.lovasz_hinge": "relu", "model.input_norm": "none"}
# ...but Config.digest hashes these at any value: it took them in when they came (its values changed
# then), before its values were pinned, with model.input_norm, the first it leaves out.
EXPERIMENT_DIGEST_KEEPS = ("train.ema_decay", "model.residual", "loss.image_only", "model.global_context",
                           "pseudo.teacher", "pseudo.max_uncertain_share", "augment.rotate_limit",
                           "loss.lovasz_hinge")
# Keys hashed under train: before they moved to run: (neither changes which model is trained):
# both digests keep them at the value every earlier run had.
MOVED_TRAIN_KEYS = {"compile": False, "sync_bn": False}
# The run: keys Config.digest hashes, under train: where they were before the run: section; the
# rest (tensorboard, checkpoint_seconds, deterministic, ... and any new one) change no weights.
EXPERIMENT_DIGEST_RUN_KEYS = ("threads", "num_workers", "parallel_folds", "fold_workers", "keep_stage1")


def is_training_key(key: str) -> bool:
    return key not in NON_TRAINING_KEYS and key.split(".")[0] not in NON_TRAINING_KEYS


def _short_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def training_digest(cfg: Config) -> str:
    """Hash of everything that decides the trained weights: a fold is reused only if it matches."""
    relevant = {k: v for k, v in flatten(cfg).items()
                if is_training_key(k) and not (k in NEUTRAL_DEFAULTS and v == NEUTRAL_DEFAULTS[k])}
    relevant.update({f"train.{k}": v for k, v in MOVED_TRAIN_KEYS.items()})
    return _short_hash(relevant)


def experiment_digest(cfg: Config, ignore: tuple[str, ...] = ("folds", "runs_dir")) -> str:
    """Hash of the config but the top-level keys `ignore`d: the weights, and how they are predicted
    and tuned (Config.digest)."""
    payload = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    run = payload.pop("run", {})
    for key, neutral in NEUTRAL_DEFAULTS.items():
        section, name = key.split(".")
        if key not in EXPERIMENT_DIGEST_KEEPS and payload.get(section, {}).get(name, neutral) == neutral:
            payload.get(section, {}).pop(name, None)
    payload["train"] = {**payload.get("train", {}), **{k: run[k] for k in EXPERIMENT_DIGEST_RUN_KEYS if k in run},
                        **MOVED_TRAIN_KEYS}
    return _short_hash(payload)


def _coerce(value: Any, annotation: Any, where: str, source: str) -> Any:
    """Check/convert one YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise PipelineError(f"{source}: '{where}' must be a mapping, got {short_repr(value)}")
        return _build(annotation, value, source, prefix=where + ".")
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise PipelineError(f"{source}: '{where}' must be a list, got {short_repr(value)}")
        return [_coerce(v, item_type, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("config fields must not be unions")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        # argparse's type=bool turns "False" into True; never here.
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise PipelineError(f"{source}: '{where}' must be true or false, got {short_repr(value)}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PipelineError(f"{source}: '{where}' must be an integer, got {short_repr(value)}")
        try:
            return int(value)
        except ValueError:
            raise PipelineError(f"{source}: '{where}' must be an integer, got {short_repr(value)}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise PipelineError(f"{source}: '{where}' must be a number, got {short_repr(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise PipelineError(f"{source}: '{where}' must be a number, got {short_repr(value)}") from None
    if annotation is str:
        if isinstance(value, bool):
            # YAML 1.1 reads a bare on/off as a boolean; for string fields ("precision: off") mean the word.
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise PipelineError(f"{source}: '{where}' must be a string, got {short_repr(value)}")
        return str(value)
    raise AssertionError(f"unsupported config annotation {annotation!r}")


def _build(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(values) - names)  # YAML keys may be numbers too
    if unknown:
        raise PipelineError(
            f"{source}: unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in values.items()}
    return cls(**kwargs)


def check_folds(folds: list[int], n_folds: int, source: str) -> None:
    """Each fold once, each in 0..n_folds-1 (source names where the list came from, e.g. "--folds")."""
    bad = [k for k in folds if not 0 <= k < n_folds]
    if bad:
        raise PipelineError(f"{source} has {bad[0]}, outside 0..{n_folds - 1} (n_folds is {n_folds})")
    repeated = sorted({k for k in folds if folds.count(k) > 1})
    if repeated:
        raise PipelineError(f"{source} names fold {repeated[0]} twice")


def _validate(cfg: Config, source: str) -> Config:
    """Choices, then every number's range (NUMBER_RANGES), then the rules between keys."""
    flat = _flatten(cfg.to_dict())
    for key, allowed in VALID_CHOICES.items():
        if flat[key] not in allowed:
            raise PipelineError(f"{source}: '{key}' is {short_repr(flat[key])}; choose one of {sorted(allowed)}")
    for aug in cfg.predict.tta:
        if aug not in VALID_TTA:
            raise PipelineError(f"{source}: 'predict.tta' has {short_repr(aug)}; choose from {sorted(VALID_TTA)}")
    _check_numbers(cfg, source)
    check_folds(cfg.folds, cfg.n_folds, f"{source}: 'folds'")
    if cfg.input.size < 101 and cfg.input.mode == "pad":
        raise PipelineError(f"{source}: 'input.size' must be >= 101 to pad, got {cfg.input.size}")
    if cfg.loss.image_only and cfg.input.mode != "pad":
        raise PipelineError(f"{source}: 'loss.image_only' needs input.mode pad (a resized input has no padding "
                            f"to leave out), got {short_repr(cfg.input.mode)}")
    model = MODELS[cfg.model.name]
    if cfg.input.size % model.input_multiple:  # the model halves its input that many times
        raise PipelineError(f"{source}: 'input.size' must be a multiple of {model.input_multiple} for "
                            f"{cfg.model.name}, got {cfg.input.size}")
    refusal = model.refusal(cfg.model)  # e.g. model.pretrained for a model without pretrained weights
    if refusal:
        raise PipelineError(f"{source}: {refusal}")
    if not 0 <= cfg.train.validate_from <= cfg.train.epochs:
        raise PipelineError(f"{source}: 'train.validate_from' must be in 0..train.epochs ({cfg.train.epochs}), "
                            f"got {cfg.train.validate_from}")
    if cfg.train.validate_from > 1 and cfg.train.scheduler == "plateau":
        raise PipelineError(f"{source}: 'train.validate_from' needs a scheduler that does not follow the "
                            "val metric (plateau does): use cosine, cosine_restarts or none")
    if cfg.train.snapshots and cfg.train.scheduler != "cosine_restarts":
        raise PipelineError(f"{source}: 'train.snapshots' needs train.scheduler: cosine_restarts")
    _check_strings(cfg, source)
    return cfg


@dataclass(frozen=True)
class _Range:
    """The values a numeric config key may take, and how the message says so."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    unit: str = ""  # what the number counts, said after the range ("degrees", "a probability")

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            shown = f"{'>' if self.low_open else '>='} {_show_number(self.low)}"
        else:
            shown = (f"in {'(' if self.low_open else '['}{_show_number(self.low)}, "
                     f"{_show_number(self.high)}{')' if self.high_open else ']'}")
        return f"{shown} {self.unit}" if self.unit else shown


def _show_number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


_PROBABILITY = _Range(0.0, 1.0, unit="(a probability)")
_COUNT = _Range(0, 1_000_000)  # e.g. patience in epochs: any larger is a typo, and overflows C ints
_CORES = _Range(0, 1024)  # threads, workers: 0 = automatic
# Every numeric key (list items as "key[]"): the range its meaning allows. A value outside it
# would raise deep inside torch or numpy, or, worse, train to the end uselessly (lr 0 or inf).
NUMBER_RANGES: dict[str, _Range] = {
    "n_folds": _Range(2, 1000),
    "folds[]": _Range(0, 999),  # and below n_folds (check_folds)
    "seed": _Range(0, 2**32 - 1),  # numpy's and sklearn's seeds
    "model.n_filters": _Range(1, 1024),
    "model.dropout": _Range(0.0, 1.0, high_open=True),
    "model.in_chans": _Range(1, 16),
    "model.decoder_channels[]": _Range(1, 4096),
    "input.size": _Range(16, 1024),
    "augment.hflip": _PROBABILITY,
    "augment.shift_scale": _PROBABILITY,
    "augment.shift_limit": _Range(0.0, 1.0),  # a share of the image size
    "augment.scale_limit": _Range(0.0, 1.0, high_open=True),  # the scale 1 - limit stays positive
    "augment.rotate_limit": _Range(0.0, 45.0, unit="degrees"),
    "augment.brightness_contrast": _PROBABILITY,
    "augment.brightness_limit": _Range(0.0, 1.0),
    "augment.contrast_limit": _Range(0.0, 1.0),
    "loss.bce_weight": _Range(0.0, 1e6),
    "loss.lovasz_weight": _Range(0.0, 1e6),
    "loss.stage2_from_epoch": _Range(-1, 1_000_000),
    "loss.empty_head_weight": _Range(0.0, 1e6),
    "loss.stage_heads_weight": _Range(0.0, 1e6),
    "train.epochs": _Range(1, 1_000_000),
    "train.batch_size": _Range(1, 65536),
    "train.lr": _Range(0.0, 10.0, low_open=True),
    "train.weight_decay": _Range(0.0, 1.0),
    "train.momentum": _Range(0.0, 1.0, high_open=True),
    "train.cycle_epochs": _Range(1, 1_000_000),
    "train.min_lr": _Range(0.0, 10.0),
    "train.plateau_patience": _COUNT,
    "train.plateau_factor": _Range(0.0, 1.0, low_open=True, high_open=True),
    "train.early_stop_patience": _COUNT,
    "run.num_workers": _CORES,
    "run.threads": _CORES,
    "train.limit_train": _Range(0, 10**9),
    "train.grad_clip": _Range(0.0, 1e6),
    "run.fold_workers": _CORES,
    "run.checkpoint_seconds": _Range(0.0, 1e9),  # seconds between last.pt writes
    "train.validate_from": _COUNT,
    "train.ema_decay": _Range(0.0, 1.0, high_open=True),
    "predict.batch_size": _Range(1, 65536),
    "pseudo.max_uncertain_share": _Range(0.0, 1.0),
    "tune.thresholds[]": _Range(0.0, 1.0, high_open=True),
    "tune.min_areas[]": _Range(0, 101 * 101),
    "tune.empty_thresholds[]": _Range(0.0, 1.0, high_open=True),
}


# Numbers that runs write to files and later read back (a hand edit or a damaged file must not
# slip through where a config value of the same meaning would be refused).
FILE_NUMBER_RANGES: dict[str, _Range] = {
    "threshold": _Range(0.0, 1.0),
    "empty_threshold": _Range(0.0, 1.0),
    "min_area": _Range(0, 101 * 101),
    "weights[]": _Range(0.0, 1e6),  # blend weights: normalised after, so only their ratio counts
    "best_score": _Range(0.0, 1.0),
    "seconds": _Range(0.0, 1e9),
}


def check_number(source: str, key: str, value: Any, allowed: _Range | None = None) -> float:
    """`value` if it is a finite number within `allowed` (default: the range of `key` in
    NUMBER_RANGES or FILE_NUMBER_RANGES); else a one-line PipelineError naming `source` and key.
    The one check for every number, whether a config's or one read back from a run's files."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineError(f"{source}: '{key}' must be a number, got {short_repr(value)}")
    if not math.isfinite(value):
        raise PipelineError(f"{source}: '{key}' must be a finite number, got {value}")
    allowed = allowed or NUMBER_RANGES.get(key) or FILE_NUMBER_RANGES.get(key)
    if allowed is not None and not allowed.holds(value):
        raise PipelineError(f"{source}: '{key}' must be {allowed}, got {_show_number(value)}")
    return value


def _numbers(cfg: Config) -> Iterator[tuple[str, str, float]]:
    """(range key, shown key, value) of every number in the config, list items one by one."""
    for key, value in flatten(cfg).items():
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    yield f"{key}[]", f"{key}[{index}]", item
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, key, value


def _check_numbers(cfg: Config, source: str) -> None:
    for range_key, key, value in _numbers(cfg):
        check_number(source, key, value, NUMBER_RANGES.get(range_key))
    if cfg.train.min_lr > cfg.train.lr:
        raise PipelineError(f"{source}: 'train.min_lr' ({_show_number(cfg.train.min_lr)}) must be <= train.lr "
                            f"({_show_number(cfg.train.lr)}): the schedule only lowers the rate")
    if cfg.loss.stage2_from_epoch >= cfg.train.epochs:
        raise PipelineError(f"{source}: 'loss.stage2_from_epoch' ({cfg.loss.stage2_from_epoch}) must be below "
                            f"train.epochs ({cfg.train.epochs}), or -1 for no stage 2")
    losses = {cfg.loss.name} | ({cfg.loss.stage2_name} if cfg.loss.stage2_from_epoch >= 0 else set())
    if "bce_lovasz" in losses and cfg.loss.bce_weight == 0 and cfg.loss.lovasz_weight == 0:
        raise PipelineError(f"{source}: 'loss.bce_weight' and 'loss.lovasz_weight' are both 0, "
                            "so bce_lovasz trains nothing")
    if not cfg.predict.tta:
        raise PipelineError(f"{source}: 'predict.tta' is empty; give at least [none]")


def check_plain_name(name: str, what: str) -> str:
    """`name` if it is one plain folder or file name (it becomes runs/<name>/, submissions/<name>.csv),
    else a PipelineError: a separator, a leading dot ("..") or a control character could make a run
    write outside its folder or a name no shell shows as it is."""
    problem = ""
    if not name or not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name:
        problem = "has a path separator"
    elif name.startswith("."):
        problem = "starts with a dot"
    elif not name.isprintable():
        problem = "has a control character"
    elif name != name.strip():
        problem = "starts or ends with a space"
    elif len(name.encode("utf-8", "surrogatepass")) > 200:
        problem = "is longer than 200 bytes"
    if problem:
        raise PipelineError(f"{what} {short_repr(name)} {problem}; it must be a plain folder name (e.g. v8_lovasz)")
    return name


def _check_strings(cfg: Config, source: str) -> None:
    check_plain_name(cfg.name, f"{source}: 'name'")
    for key, value in flatten(cfg).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "\0" in item:
                raise PipelineError(f"{source}: '{key}' has a NUL character, which no path or name may hold")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def flatten(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 0.001, ...}`: for diffs between runs and for the leaderboard."""
    return _flatten(cfg.to_dict() if isinstance(cfg, Config) else cfg)


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    import yaml

    if "=" not in assignment:
        raise PipelineError(f"--set {short_repr(assignment)}: expected key=value, e.g. train.epochs=3")
    key, raw = assignment.split("=", 1)
    key = _legacy_run_key(key.strip())
    if key == "run.checkpoint_every":
        raise PipelineError(f"--set {assignment!r}: run.checkpoint_every (epochs) was replaced by "
                            "run.checkpoint_seconds (seconds between last.pt writes)")
    try:
        value = yaml.load(raw, Loader=_unique_key_loader()) if raw != "" else ""
    except _AliasRefused:
        raise PipelineError(f"--set {short_repr(assignment)}: YAML aliases (*name) are not allowed in a config "
                            "value; write the value out") from None
    except (yaml.YAMLError, _DuplicateKey):
        value = raw
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PipelineError(f"--set {short_repr(assignment)}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _legacy_run_key(key: str) -> str:
    """`train.threads` (before the run: section) -> `run.threads`; other keys unchanged."""
    section, _, name = key.partition(".")
    return f"run.{name}" if section == "train" and name in LEGACY_RUN_KEYS else key


def _legacy_run_values(values: dict[str, Any]) -> dict[str, Any]:
    """Older spellings of run: values: compile as a bool (true = torch.compile's default mode;
    YAML also reads a bare `off` as false), and retired keys dropped."""
    run = values.get("run")
    if not isinstance(run, dict):
        return values
    run = {k: v for k, v in run.items() if k not in RETIRED_RUN_KEYS}
    if isinstance(run.get("compile"), bool):
        run["compile"] = "default" if run["compile"] else "off"
    return {**values, "run": run}


def _move_legacy_run_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A config written before the run: section, with its speed keys under train:, as run.*."""
    train = values.get("train")
    if not isinstance(train, dict) or not any(k in train for k in LEGACY_RUN_KEYS):
        return _legacy_run_values(values)
    run = values.get("run") or {}
    if not isinstance(run, dict):
        return values  # _build says run: must be a mapping
    run = dict(run)
    for key in LEGACY_RUN_KEYS:
        if key in train:
            if key in run:
                raise PipelineError(f"{source}: both 'train.{key}' and 'run.{key}' given; keep 'run.{key}'")
            run[key] = train[key]
    moved = {k: v for k, v in train.items() if k not in LEGACY_RUN_KEYS}
    return _legacy_run_values({**values, "train": moved, "run": run})


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    values = _move_legacy_run_keys(values, source)
    return _validate(_build(Config, values, source), source)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `key=value` overrides."""
    import yaml

    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        text = _read_config_text(Path(path))
        try:
            loaded = yaml.load(text, Loader=_unique_key_loader())
        except _AliasRefused as exc:
            raise PipelineError(f"{path}: line {exc.line}: YAML aliases (*name) are not allowed in a config; "
                                "write the values out (an alias can expand to gigabytes)") from None
        except _DuplicateKey as exc:
            raise PipelineError(f"{path}: key {short_repr(exc.key)} appears twice in one section (lines {exc.first} "
                                f"and {exc.again}); YAML would silently keep the last") from None
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise PipelineError(f"{path}: invalid YAML{where}") from None
        if loaded is None:
            raise PipelineError(f"{path}: empty config (no keys); a config is a mapping such as 'name: v1'")
        if not isinstance(loaded, dict):
            raise PipelineError(f"{path}: a config must be a mapping of keys to values")
        values = _move_legacy_run_keys(loaded, source)  # before the overrides, which may spell either
    for assignment in overrides:
        _apply_override(values, assignment)
    return from_dict(values, source)


MAX_CONFIG_BYTES = 1 << 20  # the shipped configs are ~2 KB; a bigger file is not a config


def _read_config_text(path: Path) -> str:
    from pipeline.fileio import read_bounded_text

    return read_bounded_text(path, MAX_CONFIG_BYTES, noun="config file", kind="a YAML config file",
                             too_large=lambda size: f"{path}: {size}, over {MAX_CONFIG_BYTES // 1024} KiB, too large for a config file",
                             encoding="utf-8-sig")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _AliasRefused(Exception):
    def __init__(self, line: int):
        super().__init__(line)
        self.line = line


@functools.cache
def _unique_key_loader() -> type:
    """yaml.SafeLoader that refuses a key repeated in one mapping (SafeLoader keeps the last
    silently, so `lr: 0.01` further down a long file would quietly undo an earlier `lr: 0.001`)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        # Configs are small and written by hand: an alias saves nothing there, while nested ones
        # (a "billion laughs" of 446 bytes) expand past a gigabyte. Refused when met, unexpanded.
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise _AliasRefused(self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        line = first_line.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:  # an unhashable key: the base class refuses it
                        continue
                    if line != key_node.start_mark.line + 1:
                        raise _DuplicateKey(key, line, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    from pipeline.fileio import write_text

    write_text(path, dump_yaml(cfg))
