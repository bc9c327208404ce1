"""The typed config: YAML -> dataclasses, validated, overridable, saved and reloaded unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, dump_yaml, flatten, load_config, save_config
from pipeline.errors import PipelineError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert dump_yaml(again) == dump_yaml(cfg)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "model.scse=false", "train.lr=1e-4", "predict.tta=[none]"])
    assert cfg.train.epochs == 3 and cfg.model.scse is False
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.predict.tta == ["none"]


def test_string_false_is_false_not_truthy():
    # argparse's type=bool trap: "False" must not become True
    assert load_config(None, ["model.hypercolumn=False"]).model.hypercolumn is False
    assert load_config(None, ["model.hypercolumn=true"]).model.hypercolumn is True


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  epochz: 3\n", "unknown config key 'train.epochz'"),
        ("train:\n  epochs: three\n", "'train.epochs' must be an integer"),
        ("loss:\n  name: no_such_loss\n", "'loss.name' is 'no_such_loss'"),
        ("model:\n  name: vgg_net\n", "'model.name' is 'vgg_net'; choose one of ['seed_unet', 'unet_<timm encoder>']"),
        ("input:\n  size: 100\n", "'input.size' must be >= 101"),
        ("train: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("n_folds: 5\nfolds: [7]\n", "'folds' has 7"),
        ("predict:\n  tta: [rot90]\n", "'predict.tta' has 'rot90'"),
        ("train:\n  ema_decay: 1.0\n", "'train.ema_decay' must be in [0, 1)"),
        ("augment:\n  rotate_limit: 90\n", "'augment.rotate_limit' must be in [0, 45] degrees"),
        ("augment:\n  hflip: 1.5\n", "'augment.hflip' must be in [0, 1] (a probability), got 1.5"),
    ],
)
def test_bad_config_is_one_line_naming_the_file(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(PipelineError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_config_file_is_one_line():
    with pytest.raises(PipelineError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_flatten_and_digest_follow_values():
    a, b = Config(), Config()
    assert a.digest() == b.digest()
    b.train.lr = 0.5
    assert a.digest() != b.digest()
    assert flatten(b)["train.lr"] == 0.5


def test_default_folds_path_names_the_dataset_and_split():
    cfg = Config(data="some/where/tgs", n_folds=5, seed=7)
    assert cfg.folds_path() == Path("folds/tgs-k5-s7.csv")
    cfg.folds_csv = "folds/mine.csv"
    assert cfg.folds_path() == Path("folds/mine.csv")
