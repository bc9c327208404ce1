"""The training kernel rehearsed as Kaggle runs it in 2026.

A Kaggle-like root (only its place is moved, by TGS_KAGGLE_ROOT: the search for the data under
input/ is the code that runs on Kaggle): the competition at input/competitions/<slug>/ built
from a small subset of the real sample (as uploaded, train.zip/test.zip beside the CSVs, or
unpacked), a weights dataset at input/datasets/<owner>/<slug>/ with a timm encoder's weights
written here, an empty working/. kernel.py runs with its working folder as the current one,
under an interpreter that has this environment's packages (Kaggle's, in the Kaggle-versions
suite) but not this project: no editable install, no PYTHONPATH. The folds fan out as two
processes on the CPU, as they do on Kaggle's T4 x2 by default.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.kaggle import COMPETITION
from tests.conftest import TGS_SAMPLE

# a kernel run in a bare interpreter and fold processes: the fast suite, not the quick tier
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 60, 20
OWNER, WEIGHTS_SLUG = "alice", "timm-resnet18-imagenet"


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A throwaway venv whose .pth lists this interpreter's site-packages as plain paths:
    their packages import, but their own .pth files (the editable install's) are not read,
    so `import pipeline` fails there, as on Kaggle."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "kaggle-image.pth").write_text("".join(f"{p}\n" for p in ours if Path(p).is_dir()))
    probe = subprocess.run([str(python), "-c", "import yaml, torch.nn\nimport pipeline"], cwd=venv,
                           env=_without_pythonpath(), capture_output=True, text=True)
    assert "No module named 'pipeline'" in probe.stderr, probe.stdout + probe.stderr
    return python


@pytest.fixture(scope="module")
def competition_subset(tmp_path_factory) -> Path:
    """N_TRAIN train and N_TEST test images of the real sample (their train.csv and depths.csv
    rows, a sample_submission.csv as Kaggle ships), or as many synthetic ones without it."""
    import pandas as pd

    out = tmp_path_factory.mktemp("subset") / "data"
    if not (TGS_SAMPLE / "train.csv").is_file():
        from pipeline.synth import generate

        generate(out, n_train=N_TRAIN, n_test=N_TEST, seed=5)
    else:
        train = pd.read_csv(TGS_SAMPLE / "train.csv", dtype=str, keep_default_na=False).head(N_TRAIN)
        test_ids = sorted(p.stem for p in (TGS_SAMPLE / "test" / "images").glob("*.png"))[:N_TEST]
        for part, ids in (("train/images", train["id"]), ("train/masks", train["id"]), ("test/images", test_ids)):
            (out / part).mkdir(parents=True)
            for image_id in ids:
                shutil.copy(TGS_SAMPLE / part / f"{image_id}.png", out / part / f"{image_id}.png")
        train.to_csv(out / "train.csv", index=False)
        depths = pd.read_csv(TGS_SAMPLE / "depths.csv", dtype=str)
        depths[depths["id"].isin(set(train["id"]) | set(test_ids))].to_csv(out / "depths.csv", index=False)
    test_ids = sorted(p.stem for p in (out / "test" / "images").glob("*.png"))
    (out / "sample_submission.csv").write_text("id,rle_mask\n" + "".join(f"{i},1 1\n" for i in test_ids))
    return out


def lay_out_competition(data: Path, folder: Path, packed: bool) -> None:
    """The competition's files as Kaggle mounts them: train.zip (images/, masks/) and test.zip
    (images/) beside the CSVs, or the same unpacked."""
    folder.mkdir(parents=True)
    for name in ("train.csv", "depths.csv", "sample_submission.csv"):
        shutil.copy(data / name, folder / name)
    for part in ("train", "test"):
        if not packed:
            shutil.copytree(data / part, folder / part)
            continue
        with zipfile.ZipFile(folder / f"{part}.zip", "w") as bundle:
            for path in sorted((data / part).rglob("*.png")):
                bundle.write(path, path.relative_to(data / part).as_posix())


def write_encoder_weights(folder: Path) -> dict:
    """A resnet18's weights (seeded, no download) as `kaggle weights-dataset` writes them."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(23)
    weights = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "resnet18.safetensors"))
    return weights


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders` with its content's digest: what must not change."""
    seen = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def build_rehearsal_kernel(out: Path) -> Path:
    """A tiny run of a timm UNet that starts from the weights dataset: 2 folds, 1 epoch, folds
    as processes; lr 1e-12 so the trained encoder still equals the weights it started from."""
    argv = ["kaggle", "kernel", "build", "--config", str(REPO / "configs" / "cpu_quick.yaml"), "--user", OWNER,
            "--out", str(out), "--weights-dataset", f"{OWNER}/{WEIGHTS_SLUG}",
            "--set", "name=rehearsal", "--set", "model.name=unet_resnet18",
            "--set", "model.decoder_channels=[16,8,8,8,8]", "--set", "input.size=128", "--set", "n_folds=2",
            "--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.lr=1e-12",
            "--set", "train.min_lr=0", "--set", "predict.tta=[none]", "--set", "run.parallel_folds=true"]
    assert main(argv) == 0
    return out


def check_encoder_came_from(checkpoint: Path, weights: dict) -> None:
    """The fold's encoder is the dataset's weights (its first conv adapted to one channel by
    timm, the RGB filters summed); BatchNorm running statistics move in training and the
    classifier is not part of an encoder."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    compared = 0
    for key, tensor in weights.items():
        if key.startswith("fc.") or key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        expected = tensor.sum(dim=1, keepdim=True) if key == "conv1.weight" else tensor
        assert torch.allclose(state[f"encoder.{key}"].float(), expected, atol=1e-6), key
        compared += 1
    assert compared > 50


def rehearse(tmp_path: Path, bare_python: Path, data: Path, packed: bool) -> None:
    from pipeline.submit import check_submission

    root = tmp_path / "kaggle"
    lay_out_competition(data, root / "input" / "competitions" / COMPETITION, packed)
    weights = write_encoder_weights(root / "input" / "datasets" / OWNER / WEIGHTS_SLUG)
    working, temp, home = root / "working", tmp_path / "tmp", tmp_path / "home"
    for folder in (working, temp, home):
        folder.mkdir()
    kernel_dir = build_rehearsal_kernel(tmp_path / "kernel")
    untouched = snapshot(root / "input", home, kernel_dir)

    env = dict(_without_pythonpath(), TGS_KAGGLE_ROOT=str(root), TMPDIR=str(temp), HOME=str(home))
    result = subprocess.run([str(bare_python), str(kernel_dir / "kernel.py")], cwd=working, env=env,
                            capture_output=True, text=True, timeout=600)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert f"pipeline from {temp}" in result.stdout, log
    assert f"competition files: {root / 'input' / 'competitions' / COMPETITION}" in result.stdout, log
    assert "training folds [0, 1] in 2 parallel processes" in result.stdout, log
    assert check_submission(working / "submission.csv", data) == N_TEST
    for fold in (0, 1):
        check_encoder_came_from(working / "runs" / "rehearsal" / f"fold{fold}" / "best.pt", weights)
    assert snapshot(root / "input", home, kernel_dir) == untouched, "the kernel wrote outside working/ and TMPDIR"
    assert sorted(p.name for p in root.iterdir()) == ["input", "working"]
    assert not (working / "tgs-salt-data").exists() and not any(working.glob("*.png")), "the output holds results"


def test_kernel_rehearsal_zipped_competition_folds_as_processes_weights_from_a_dataset(
        tmp_path, bare_python, competition_subset):
    """Kaggle's TGS upload (train.zip/test.zip beside the CSVs) at input/competitions/<slug>."""
    rehearse(tmp_path, bare_python, competition_subset, packed=True)


@pytest.mark.slow
def test_kernel_rehearsal_unpacked_competition(tmp_path, bare_python, competition_subset):
    """The same with the competition unpacked (train/, test/ folders), used in place."""
    rehearse(tmp_path, bare_python, competition_subset, packed=False)


def test_fold_processes_import_the_package_their_launcher_runs(tmp_path, bare_python):
    """A launcher that has `pipeline` on its sys.path only (the kernel's unpacked bundle, an
    uninstalled checkout) gives its fold processes the same package."""
    launcher = (f"import os, subprocess, sys\n"
                f"sys.path.insert(0, {str(REPO)!r})\n"
                "from pipeline.train_folds import fold_process_env\n"
                "child = subprocess.run([sys.executable, '-c', 'import pipeline; print(pipeline.__file__)'],\n"
                "                       env=fold_process_env(dict(os.environ)), capture_output=True, text=True)\n"
                "print(child.stdout + child.stderr)\n")
    result = subprocess.run([str(bare_python), "-c", launcher], cwd=tmp_path, env=_without_pythonpath(),
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == str(REPO / "pipeline" / "__init__.py"), result.stdout + result.stderr
