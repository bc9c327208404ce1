"""The run: section (threads, workers, parallel folds, keep_stage1) apart from the
hyper-parameters: every shipped config keeps the digests it had before the section existed,
and a config.yaml written with those keys under train: loads as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import LEGACY_RUN_KEYS, load_config
from pipeline.errors import PipelineError
from pipeline.rundir import is_training_key, training_digest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# (training_digest, Config.digest) of every shipped config, computed on main before the
# run: section existed (the speed keys were under train:).
# gpu_best and resnet34_lovasz changed on purpose since (model.pretrained: true, issue 20; then
# model.input_norm: imagenet, issue 30); trained from scratch without the normalisation they
# keep the digests they had (FROM_SCRATCH below).
PINNED = {
    "cpu_best.yaml": ("0eb579a8353a3b9a", "88f946b06e0485fb"),
    "cpu_quick.yaml": ("dbf5b67965ee440c", "82fa47cd5251c7d8"),
    "demo.yaml": ("8d5b00b2b9ea83eb", "320200695e40bd3a"),  # added with the run: section, pinned as made
    "gpu_best.yaml": ("ecdc23f14192611a", "e58a81f076ca3e18"),
    "resnet34_lovasz.yaml": ("7ab334eac8643884", "899ccf851b38fd75"),
    "seed_unet.yaml": ("3f3bdbb76fe73cf4", "ee91ee790a373ba9"),
}
FROM_SCRATCH = {
    "gpu_best.yaml": ("025387b3ddba87e2", "d44704505814a7ce"),
    "resnet34_lovasz.yaml": ("cef23a9a7af7b912", "3ab7eb9fd92b5918"),
}
SPEED_KEYS = ("train.threads=1", "train.num_workers=2", "train.parallel_folds=true", "train.fold_workers=3",
              "train.keep_stage1=true")


def test_every_shipped_config_is_pinned():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_configs_keep_their_digests(name):
    cfg = load_config(CONFIGS / name)
    assert (training_digest(cfg), cfg.digest()) == PINNED[name]


@pytest.mark.parametrize("name", sorted(FROM_SCRATCH))
def test_gpu_presets_trained_from_scratch_keep_the_digests_of_their_runs_before_imagenet_weights(name):
    cfg = load_config(CONFIGS / name, ["model.pretrained=false", "model.input_norm=none"])
    assert (training_digest(cfg), cfg.digest()) == FROM_SCRATCH[name]


def test_the_defaults_keep_their_digests():
    cfg = load_config(None)
    assert (training_digest(cfg), cfg.digest()) == ("0ab099ec671bee84", "da0626f373f026c8")


def test_speed_keys_set_the_old_way_land_in_run_and_leave_the_training_digest_alone():
    cfg = load_config(CONFIGS / "cpu_best.yaml", SPEED_KEYS)
    assert (cfg.run.threads, cfg.run.num_workers, cfg.run.parallel_folds, cfg.run.fold_workers,
            cfg.run.keep_stage1) == (1, 2, True, 3, True)
    # both digests as on main with the same overrides
    assert (training_digest(cfg), cfg.digest()) == ("0eb579a8353a3b9a", "4c93753f5ff9b31f")
    assert not any(is_training_key(f"run.{key}") for key in ("threads", "num_workers", "keep_stage1"))


def test_an_old_config_yaml_with_speed_keys_under_train_loads_with_the_same_digest(tmp_path):
    new = load_config(CONFIGS / "cpu_best.yaml")
    # the config.yaml a run made before the run: section held: the speed keys under train:
    values = new.to_dict()
    # (the keys the run: section had then; later ones such as run.checkpoint_every never were there)
    run = values.pop("run")
    values["train"].update({key: run[key] for key in LEGACY_RUN_KEYS})
    text = yaml.safe_dump(values, sort_keys=False)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    old = load_config(path)
    assert old == new
    assert training_digest(old) == training_digest(new) == PINNED["cpu_best.yaml"][0]
    assert old.digest() == PINNED["cpu_best.yaml"][1]
    # and --set may spell the key either way, the last one given winning
    assert load_config(path, ["run.threads=3"]).run.threads == 3
    assert load_config(path, ["train.threads=4"]).run.threads == 4


def test_a_config_giving_a_speed_key_in_both_places_is_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("train:\n  threads: 1\nrun:\n  threads: 2\n")
    with pytest.raises(PipelineError, match=r"both 'train.threads' and 'run.threads' given"):
        load_config(path)


def test_a_key_added_to_the_neutral_table_leaves_both_digests_at_its_neutral_value_only(monkeypatch):
    """One table for both digests: a key added later (model.scse standing in for one) hashes as it
    did at any other value, and at its neutral value leaves both digests as they were without it."""
    from pipeline import config

    assert set(config.EXPERIMENT_DIGEST_KEEPS) < set(config.NEUTRAL_DEFAULTS)
    assert set(config.EXPERIMENT_DIGEST_RUN_KEYS) <= set(config.RunConfig.__dataclass_fields__)
    plain, on = load_config(None), load_config(None, ["model.scse=true"])
    before = {cfg.model.scse: (training_digest(cfg), cfg.digest()) for cfg in (plain, on)}
    monkeypatch.setitem(config.NEUTRAL_DEFAULTS, "model.scse", False)
    assert (training_digest(on), on.digest()) == before[True]
    neutral = (training_digest(plain), plain.digest())
    assert neutral[0] != before[False][0] and neutral[1] != before[False][1]
    # ...which is the digest of the same config without the key
    assert neutral[1] == config._short_hash(_without(plain, "model", "scse"))


def _without(cfg, section: str, key: str) -> dict:
    from pipeline import config

    payload = {k: v for k, v in cfg.to_dict().items() if k not in ("folds", "runs_dir")}
    run = payload.pop("run")
    del payload[section][key]
    del payload["model"]["input_norm"]  # at its neutral value, as Config.digest leaves it out
    payload["train"].update({k: run[k] for k in config.EXPERIMENT_DIGEST_RUN_KEYS}, **config.MOVED_TRAIN_KEYS)
    return payload
