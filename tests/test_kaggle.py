"""`python -m pipeline kaggle ...` against a fake `kaggle` executable placed first on PATH.

The fake records its argv and serves files from a folder the test fills (the competition
zip for `download`, a submission.csv for `kernels output`), so the exact command lines, the
unpacking of the real archive's nested train.zip/test.zip, the verification and the
kernel bundle are all checked without a network or an account.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.kaggle import COMPETITION, credentials, dataset, kernel

REPO = Path(__file__).resolve().parents[1]
KAGGLE_MODULES = ("commands", "credentials", "dataset", "kernel", "submission", "weights")

FAKE_KAGGLE = '''\
#!{python}
"""A stand-in for the kaggle CLI: logs its argv, serves files from $FAKE_KAGGLE_SERVE."""
import json, os, shutil, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_KAGGLE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_KAGGLE_FAIL"):
    print("Downloading tgs-salt-identification-challenge.zip")
    print(os.environ["FAKE_KAGGLE_FAIL"], file=sys.stderr)
    sys.exit(1)
serve = Path(os.environ["FAKE_KAGGLE_SERVE"])

def option(flag):
    return args[args.index(flag) + 1]

if args[:2] == ["competitions", "download"]:
    shutil.copy(serve / "competition.zip", Path(option("-p")) / (args[2] + ".zip"))
    print("100%|##########| 1.00M/1.00M [00:00<00:00, 9.9MB/s]")
elif args[:2] == ["competitions", "submit"]:
    print("Successfully submitted to TGS Salt Identification Challenge")
elif args[:2] == ["kernels", "push"]:
    print(os.environ.get("FAKE_KAGGLE_PUSH", "Kernel version 1 successfully pushed.  Please check progress at https://www.kaggle.com/code/x"))
elif args[:2] == ["kernels", "status"]:
    print(args[2] + ' has status "' + os.environ.get("FAKE_KAGGLE_STATUS", "KernelWorkerStatus.COMPLETE") + '"')
    if os.environ.get("FAKE_KAGGLE_STATUS", "").endswith("ERROR"):
        print('Failure message: "Your notebook tried to allocate more memory than is available."')
elif args[:2] == ["datasets", "create"]:
    print(os.environ.get("FAKE_KAGGLE_DATASET", "Your private Dataset is being created. Please check progress at https://www.kaggle.com/datasets/x"))
elif args[:2] == ["kernels", "output"]:
    shutil.copy(serve / "submission.csv", Path(option("-p")) / "submission.csv")
    print("Output file downloaded to " + option("-p") + "/submission.csv")
else:
    print("fake kaggle: unexpected command", args, file=sys.stderr)
    sys.exit(2)
'''


class FakeKaggle:
    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.serve = root / "serve"
        self.log = root / "argv.jsonl"
        self.bin.mkdir(parents=True)
        self.serve.mkdir(parents=True)
        script = self.bin / "kaggle"
        script.write_text(FAKE_KAGGLE.format(python=sys.executable))
        script.chmod(0o755)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def fake_kaggle(tmp_path, monkeypatch) -> FakeKaggle:
    fake = FakeKaggle(tmp_path / "fake")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # a real ~/.kaggle never leaks into a test
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "FAKE_KAGGLE_FAIL", "FAKE_KAGGLE_PUSH",
                 "FAKE_KAGGLE_STATUS", "FAKE_KAGGLE_DATASET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("FAKE_KAGGLE_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_KAGGLE_SERVE", str(fake.serve))
    return fake


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from pipeline.synth import generate

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, n_train=16, n_test=6, seed=3)
    return out


# ---------------------------------------------------------------- archives like Kaggle's


def _add_tree(bundle: zipfile.ZipFile, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bundle.write(path, prefix + path.relative_to(folder).as_posix())


def _nested_zip(path: Path, folder: Path, prefix: str) -> None:
    with zipfile.ZipFile(path, "w") as bundle:
        _add_tree(bundle, folder, prefix)


def competition_zip(data: Path, out: Path, style: str = "nested") -> Path:
    """The competition archive: "nested" as Kaggle ships it (train.zip holds images/ and
    masks/, test.zip holds images/, beside the CSVs), "wrapped" (train.zip holds train/...),
    or "folders" (train/ and test/ directly in the archive)."""
    staging = out.parent / f"{out.stem}-parts"
    staging.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as bundle:
        for name in ("train.csv", "depths.csv", "sample_submission.csv"):
            if (data / name).exists():
                bundle.write(data / name, name)
            else:  # the real sample in ../shared/tgs comes without it; Kaggle always ships one
                ids = sorted(p.stem for p in (data / "test" / "images").glob("*.png"))
                bundle.writestr(name, "id,rle_mask\n" + "".join(f"{i},1 1\n" for i in ids))
        if style == "folders":
            _add_tree(bundle, data / "train", "train/")
            _add_tree(bundle, data / "test", "test/")
        else:
            for part in ("train", "test"):
                prefix = f"{part}/" if style == "wrapped" else ""
                _nested_zip(staging / f"{part}.zip", data / part, prefix)
                bundle.write(staging / f"{part}.zip", f"{part}.zip")
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------- download


@pytest.mark.parametrize("style", ["nested", "wrapped", "folders"])
def test_download_runs_kaggle_then_unpacks_and_verifies_the_layout(fake_kaggle, tiny_data, tmp_path, capsys, style):
    competition_zip(tiny_data, fake_kaggle.serve / "competition.zip", style)
    out = tmp_path / "tgs"

    assert main(["kaggle", "download", "--out", str(out)]) == 0

    assert fake_kaggle.calls() == [["competitions", "download", COMPETITION, "-p", str(out)]]
    for entry in ("train/images", "train/masks", "test/images"):
        assert sorted(p.name for p in (out / entry).iterdir()) == sorted(p.name for p in (tiny_data / entry).iterdir())
    for name in ("train.csv", "depths.csv", "sample_submission.csv"):
        assert (out / name).read_bytes() == (tiny_data / name).read_bytes()
    assert not list(out.glob(".unpack-*")), "the staging folder is cleaned up"
    assert not (out / "train.zip").exists() and not (out / "train" / "train").exists()
    assert "16 train images" in capsys.readouterr().out


def test_download_again_replaces_the_old_layout_without_stale_images(fake_kaggle, tiny_data, tmp_path):
    from pipeline.synth import generate

    other = tmp_path / "other"
    generate(other, n_train=5, n_test=2, seed=11)
    out = tmp_path / "tgs"
    competition_zip(tiny_data, fake_kaggle.serve / "competition.zip")
    assert main(["kaggle", "download", "--out", str(out)]) == 0
    competition_zip(other, fake_kaggle.serve / "competition.zip")
    assert main(["kaggle", "download", "--out", str(out)]) == 0

    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == \
        sorted(p.name for p in (other / "train" / "images").iterdir())
    assert dataset.verify_dataset(out) == dataset.verify_dataset(other)


def test_download_opens_competition_data_zip_only_when_train_and_test_zips_are_absent(
        fake_kaggle, tiny_data, tmp_path):
    archive = competition_zip(tiny_data, fake_kaggle.serve / "competition.zip", "nested")
    with zipfile.ZipFile(archive, "a") as bundle:  # unreadable: opening it would fail the download
        bundle.writestr("competition_data.zip", b"not a zip")
    assert main(["kaggle", "download", "--out", str(tmp_path / "a")]) == 0

    inner = competition_zip(tiny_data, tmp_path / "competition_data.zip", "folders")
    with zipfile.ZipFile(fake_kaggle.serve / "competition.zip", "w") as bundle:
        bundle.write(inner, "competition_data.zip")
    assert main(["kaggle", "download", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "train.csv").read_bytes() == (tiny_data / "train.csv").read_bytes()
    assert not (tmp_path / "b" / "competition_data").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_crc"])
def test_download_rejects_a_corrupted_archive_in_one_line(fake_kaggle, tiny_data, tmp_path, capsys, damage):
    good = competition_zip(tiny_data, tmp_path / "good.zip", "folders").read_bytes()
    if damage == "garbage":
        bad = b"<html>rate limited</html>"
    elif damage == "truncated":
        bad = good[: len(good) // 2]
    else:  # flip bytes inside the first stored member's data: the CRC check catches it
        offset = 30 + len("train.csv") + 5
        bad = good[:offset] + bytes(b ^ 0xFF for b in good[offset:offset + 8]) + good[offset + 8:]
    (fake_kaggle.serve / "competition.zip").write_bytes(bad)

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert f"{COMPETITION}.zip" in line and "corrupted" in line


def test_download_rejects_train_csv_that_disagrees_with_the_masks(fake_kaggle, tiny_data, tmp_path, capsys):
    from pipeline.rle import read_rle_csv, write_rle_csv

    data = tmp_path / "tampered"
    shutil.copytree(tiny_data, data)
    table = read_rle_csv(data / "train.csv")
    salty = next(i for i, rle in zip(table["id"], table["rle_mask"]) if rle)
    rles = ["1 5" if image_id == salty else rle for image_id, rle in zip(table["id"], table["rle_mask"])]
    write_rle_csv(data / "train.csv", table["id"].tolist(), rles)
    competition_zip(data, fake_kaggle.serve / "competition.zip")

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert "train.csv" in line and salty in line and "does not match" in line


def test_download_rejects_a_mask_missing_from_the_archive(fake_kaggle, tiny_data, tmp_path, capsys):
    data = tmp_path / "partial"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "train" / "masks").iterdir())[0]
    victim.unlink()
    competition_zip(data, fake_kaggle.serve / "competition.zip")

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert f"train/masks/{victim.name}: missing" in line and "16 train images, 15 masks" in line


@pytest.mark.parametrize("evil_name", ["../escaped.txt", "/tmp/absolute-escape.txt", "train/../../escaped.txt"])
def test_download_refuses_zip_entries_that_leave_the_folder(fake_kaggle, tiny_data, tmp_path, capsys, evil_name):
    archive = competition_zip(tiny_data, fake_kaggle.serve / "competition.zip", "folders")
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr(zipfile.ZipInfo(evil_name), b"pwned")
    out = tmp_path / "deep" / "tgs"

    assert main(["kaggle", "download", "--out", str(out)]) == 2
    assert "unsafe entry" in _one_error_line(capsys)
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (out.parent.parent / "escaped.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
    assert not (out / "train").exists(), "nothing is placed when the archive is refused"


# ---------------------------------------------------------------- credentials and failures


def test_no_credentials_is_one_line_and_exit_2_without_calling_kaggle(fake_kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert "no Kaggle credentials" in line and "kaggle.json" in line and "KAGGLE_KEY" in line
    assert fake_kaggle.calls() == []


@pytest.mark.parametrize("content, problem", [
    ("username: alice\nkey: x\n", "not valid JSON"),
    ('{"username": "alice"}', "no 'key' field"),
    ('{"username": "alice", "key": 12345}', "'key' is a JSON number, expected a non-empty string"),
    ('{"username": "", "key": "abc"}', "'username' is empty"),
    ('["alice", "abc"]', "expected a JSON object"),
    (b'\xff\xfe{"username": "alice"}', "not UTF-8"),
    ("a folder", "is a folder"),
    ("a dangling link", "not found"),
])
@pytest.mark.parametrize("where", ["home", "config_dir_env"])
def test_a_damaged_kaggle_json_is_one_line_naming_it_without_calling_kaggle(fake_kaggle, tmp_path, monkeypatch,
                                                                            capsys, content, problem, where):
    # the real CLI answers these with a 15-line traceback (a folder, a list, not UTF-8) or its help page
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    folder = Path(os.environ["HOME"]) / ".kaggle"
    if where == "config_dir_env":
        folder = tmp_path / "cfg"
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(folder))
    folder.mkdir()
    path = folder / "kaggle.json"
    if content == "a folder":
        path.mkdir()
    elif content == "a dangling link":
        path.symlink_to(folder / "gone.json")
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {path}: ") and problem in line, line
    assert "settings/api" in line  # where a new token comes from
    assert "12345" not in line  # a key is never echoed
    assert fake_kaggle.calls() == []


def test_a_good_kaggle_json_is_found_and_env_credentials_skip_it(fake_kaggle, monkeypatch):
    folder = Path(os.environ["HOME"]) / ".kaggle"
    folder.mkdir()
    (folder / "kaggle.json").write_text("not json")
    assert credentials.find_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY"  # the CLI then ignores the file
    monkeypatch.delenv("KAGGLE_USERNAME")
    (folder / "kaggle.json").write_text('{"username": "alice", "key": "0123", "proxy": "http://p"}')
    assert credentials.find_credentials() == str(folder / "kaggle.json")


@pytest.mark.parametrize("where", ["api_token_env", "config_dir_env", "home_kaggle", "xdg", "access_token"])
def test_credentials_are_found_where_the_kaggle_cli_looks(fake_kaggle, tmp_path, monkeypatch, where):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    home = Path(os.environ["HOME"])
    assert credentials.find_credentials() is None
    if where == "api_token_env":
        monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_x")
    elif where == "config_dir_env":
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "kaggle.json").write_text('{"username": "a", "key": "b"}')
    elif where == "home_kaggle":
        (home / ".kaggle").mkdir()
        (home / ".kaggle" / "kaggle.json").write_text('{"username": "a", "key": "b"}')
    elif where == "xdg":  # used only when ~/.kaggle does not exist
        (home / ".config" / "kaggle").mkdir(parents=True)
        (home / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "a", "key": "b"}')
    else:
        (home / ".kaggle").mkdir()
        (home / ".kaggle" / "access_token").write_text("KGAT_x")
    assert credentials.find_credentials() is not None


def test_missing_kaggle_executable_says_to_install_the_project(fake_kaggle, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(credentials, "_VENV_BIN", empty)

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert "`kaggle` command was not found" in line and "install the project" in line


def test_kaggle_http_403_becomes_one_line_with_the_accept_rules_hint(fake_kaggle, tmp_path, monkeypatch, capsys):
    # What kaggle 2.2's main() prints for an HTTPError: the status line, a blank, the hint.
    monkeypatch.setenv("FAKE_KAGGLE_FAIL", textwrap.dedent(f"""\
        403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/competitions/data/download-all/{COMPETITION}

        You don't have access to this resource.
        If this is a competition, you may need to accept its rules first at
          https://www.kaggle.com/competitions/<competition>/rules"""))

    assert main(["kaggle", "download", "--out", str(tmp_path / "tgs")]) == 2
    line = _one_error_line(capsys)
    assert "kaggle competitions download failed (exit 1): 403 Client Error: Forbidden" in line
    assert "accept the competition rules on the website first" in line


def test_kaggle_failure_quotes_its_last_meaningful_line(fake_kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KAGGLE_FAIL", "ValueError: Invalid folder: nowhere\n\nIf this is unexpected, you can "
                                           "re-run with `kaggle --debug [command]` to see the full")

    assert main(["kaggle", "kernel", "status", "--dir", str(_built_kernel(tmp_path))]) == 2
    assert _one_error_line(capsys).endswith("(exit 1): ValueError: Invalid folder: nowhere")


# ---------------------------------------------------------------- submit


def _write_submission(path: Path, data: Path, rle: str = "") -> Path:
    from pipeline.data import list_image_ids
    from pipeline.rle import write_rle_csv

    ids = list_image_ids(data / "test" / "images")
    write_rle_csv(path, ids, [rle] * len(ids))
    return path


def test_submit_checks_the_csv_then_submits_it(fake_kaggle, tiny_data, tmp_path, capsys):
    csv = _write_submission(tmp_path / "sub.csv", tiny_data, "1 10 200 5")

    assert main(["kaggle", "submit", "--csv", str(csv), "-m", "fold avg, hflip TTA", "--test", str(tiny_data)]) == 0
    assert fake_kaggle.calls() == [["competitions", "submit", COMPETITION, "-f", str(csv), "-m", "fold avg, hflip TTA"]]
    assert "Successfully submitted" in capsys.readouterr().out


def test_submit_refuses_a_csv_missing_test_ids_before_calling_kaggle(fake_kaggle, tiny_data, tmp_path, capsys):
    csv = _write_submission(tmp_path / "sub.csv", tiny_data)
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")

    assert main(["kaggle", "submit", "--csv", str(csv), "-m", "x", "--test", str(tiny_data)]) == 2
    assert "have no row" in _one_error_line(capsys)
    assert fake_kaggle.calls() == []


def test_submit_without_test_folder_still_validates_header_and_rle(fake_kaggle, tiny_data, tmp_path, capsys):
    bad = _write_submission(tmp_path / "bad.csv", tiny_data, "5 3 1 2")  # runs go backwards
    assert main(["kaggle", "submit", "--csv", str(bad), "-m", "x"]) == 2
    assert "bad RLE" in _one_error_line(capsys)
    assert fake_kaggle.calls() == []

    good = _write_submission(tmp_path / "good.csv", tiny_data, "1 3")
    assert main(["kaggle", "submit", "--csv", str(good), "-m", "x"]) == 0
    assert fake_kaggle.calls() == [["competitions", "submit", COMPETITION, "-f", str(good), "-m", "x"]]


# ---------------------------------------------------------------- kernel build


def _built_kernel(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "kernels" / "train"
    argv = ["kaggle", "kernel", "build", "--config", str(REPO / "configs" / "cpu_quick.yaml"),
            "--user", "alice", "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def check_kernel_metadata(folder: Path) -> dict:
    """What `kaggle kernels push` (kaggle 2.2.5, KaggleApi.kernels_push) requires of
    kernel-metadata.json, plus what this kernel needs (GPU on, internet explicitly off)."""
    metadata = json.loads((folder / "kernel-metadata.json").read_text())
    owner, slug = metadata["id"].split("/")  # exactly user/slug, no version
    assert owner and len(slug) >= 5  # validate_kernel_string
    assert isinstance(metadata["title"], str) and len(metadata["title"]) >= 5
    assert isinstance(metadata["code_file"], str) and (folder / metadata["code_file"]).is_file()
    assert metadata["language"] in ["python", "r", "rmarkdown"]
    assert metadata["kernel_type"] in ["script", "notebook"]
    for flag in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        assert isinstance(metadata[flag], bool), flag  # get_bool: bool or "true"/"false"
    for sources in ("dataset_sources", "competition_sources", "kernel_sources", "model_sources"):
        assert isinstance(metadata[sources], list) and all(isinstance(s, str) for s in metadata[sources])
    assert isinstance(metadata["machine_shape"], str) and metadata["machine_shape"]
    return metadata


def test_kernel_build_writes_metadata_kaggle_accepts(fake_kaggle, tmp_path):
    folder = _built_kernel(tmp_path, "--gpu", "NvidiaL4")
    metadata = check_kernel_metadata(folder)

    assert metadata["id"] == "alice/tgs-salt-pipeline-train"
    assert metadata["title"] == "TGS Salt Pipeline Train"
    assert (metadata["code_file"], metadata["language"], metadata["kernel_type"]) == ("kernel.py", "python", "script")
    assert metadata["is_private"] and metadata["enable_gpu"]
    assert not metadata["enable_tpu"] and not metadata["enable_internet"]
    assert metadata["machine_shape"] == "NvidiaL4"
    assert metadata["competition_sources"] == [COMPETITION]
    assert metadata["dataset_sources"] == metadata["kernel_sources"] == metadata["model_sources"] == []
    assert fake_kaggle.calls() == [], "building talks to nobody"


@pytest.mark.parametrize("slug", ["tgs-salt-pipeline-train", "salt-unet-resnet34", "tgs-cv-5fold"])
def test_kernel_title_slugifies_back_to_the_slug(slug):
    slugify = pytest.importorskip("slugify").slugify  # the function kaggle's push uses
    assert slugify(kernel.title_from_slug(slug)) == slug


def test_checked_in_kernel_metadata_has_the_same_fields_with_a_placeholder_user():
    checked_in = json.loads((REPO / "kernels" / "train" / "kernel-metadata.json").read_text())
    rendered = kernel.kernel_metadata("your-kaggle-username", "tgs-salt-pipeline-train")
    assert checked_in == rendered


def run_kaggle_api_probe(probe: str, tmp_path) -> subprocess.CompletedProcess:
    """Run `probe` (code calling the real kaggle library up to its network call) in a fresh
    process with fake credentials and a private home: the library authenticates at import."""
    env = {"HOME": str(tmp_path / "home"), "PATH": os.environ["PATH"], "KAGGLE_USERNAME": "alice",
           "KAGGLE_KEY": "0123456789abcdef", "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)


def test_kernel_metadata_passes_the_kaggle_clis_own_push_validation(tmp_path):
    """Run kaggle's KaggleApi.kernels_push up to the network call, in a subprocess with a
    throwaway HOME (importing kaggle authenticates and creates its config folder)."""
    folder = tmp_path / "kernel"
    folder.mkdir()
    (folder / "kernel.py").write_text("print('hi')\n")
    (folder / "kernel-metadata.json").write_text(json.dumps(kernel.kernel_metadata("alice", "tgs-salt-pipeline-train")))
    probe = textwrap.dedent(f"""
        from kaggle.api.kaggle_api_extended import KaggleApi
        class Reached(Exception):
            pass
        def stop(*args, **kwargs):
            raise Reached
        api = KaggleApi()
        api.build_kaggle_client = stop
        try:
            api.kernels_push({str(folder)!r})
        except Reached:
            print("VALIDATED")
    """)
    result = run_kaggle_api_probe(probe, tmp_path)
    assert "VALIDATED" in result.stdout, result.stdout + result.stderr
    assert "does not resolve to the specified id" not in result.stdout


@pytest.mark.parametrize("flag, value, message", [
    ("--slug", "Bad Slug", "--slug 'Bad Slug'"),
    ("--slug", "tgs", "--slug 'tgs'"),
    ("--user", "a/b", "--user 'a/b'"),
])
def test_kernel_build_rejects_bad_names_in_one_line(tmp_path, capsys, flag, value, message):
    argv = ["kaggle", "kernel", "build", "--config", str(REPO / "configs" / "cpu_quick.yaml"),
            "--user", "alice", "--out", str(tmp_path / "k"), flag, value]
    assert main(argv) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "k").exists()


def test_kernel_py_embeds_the_package_and_the_resolved_config(tmp_path):
    from pipeline.config import load_config

    folder = _built_kernel(tmp_path, "--set", "train.epochs=2", "--set", "name=kaggle_quick")
    source = (folder / "kernel.py").read_text()
    compile(source, "kernel.py", "exec")  # valid Python
    kernel = runpy.run_path(str(folder / "kernel.py"), run_name="kernel_under_test")  # defines, runs nothing

    src = kernel["unpack_bundle"](tmp_path / "src")
    package = REPO / "pipeline"
    expected = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    bundled = sorted(p.relative_to(src / "pipeline").as_posix() for p in (src / "pipeline").rglob("*") if p.is_file())
    assert bundled == expected
    for name in expected:
        assert (src / "pipeline" / name).read_bytes() == (package / name).read_bytes(), name
    cfg = load_config(src / "config.yaml")
    assert cfg == load_config(REPO / "configs" / "cpu_quick.yaml", ["train.epochs=2", "name=kaggle_quick"])
    assert "import kaggle\n" not in source  # importing kaggle authenticates; the kernel never does


def test_kernel_pseudo_round_is_a_flag_of_the_rendered_kernel(tmp_path, capsys):
    plain = runpy.run_path(str(_built_kernel(tmp_path / "a", "--set", "name=k1") / "kernel.py"), run_name="k")
    assert plain["PSEUDO_ROUND"] is False and plain["RUN_NAME"] == "k1"
    folder = _built_kernel(tmp_path / "b", "--set", "name=k1", "--pseudo-round")
    assert runpy.run_path(str(folder / "kernel.py"), run_name="k")["PSEUDO_ROUND"] is True
    # the kernel's teacher is its own first run, never a run dir of this machine
    argv = ["kaggle", "kernel", "build", "--config", str(REPO / "configs" / "cpu_quick.yaml"), "--user", "alice",
            "--out", str(tmp_path / "c"), "--pseudo-round", "--set", "pseudo.teacher=runs/v8"]
    assert main(argv) == 2
    assert "the kernel's teacher is its own first run" in capsys.readouterr().err


def test_kernel_build_is_reproducible(tmp_path):
    first = (_built_kernel(tmp_path / "a") / "kernel.py").read_bytes()
    second = (_built_kernel(tmp_path / "b") / "kernel.py").read_bytes()
    assert first == second


def test_importing_the_kaggle_package_does_not_import_kaggle_or_torch():
    modules = ", ".join(f"pipeline.kaggle.{name}" for name in KAGGLE_MODULES)
    code = f"import sys, {modules}; print(sorted(m for m in ('kaggle', 'torch', 'pandas') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_pipeline_kaggle_does_not_shadow_the_kaggle_library():
    """`import kaggle` still finds the official library, with pipeline.kaggle loaded or not."""
    code = ("import importlib.util, pipeline.kaggle.commands, pipeline.kaggle.credentials; "
            "print(importlib.util.find_spec('kaggle').origin)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    origin = Path(result.stdout.strip())
    assert origin.name == "__init__.py" and (REPO / "pipeline") not in origin.parents, result.stderr


# ---------------------------------------------------------------- pretrained encoders in the kernel


def _build_preset(tmp_path: Path, config: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "kernels" / "train"
    argv = ["kaggle", "kernel", "build", "--config", str(REPO / "configs" / config), "--user", "alice",
            "--out", str(out), *extra]
    return main(argv), out


def _embedded_config(folder: Path, tmp_path: Path):
    from pipeline.config import load_config

    kernel_module = runpy.run_path(str(folder / "kernel.py"), run_name="kernel_under_test")
    return load_config(kernel_module["unpack_bundle"](tmp_path / "src") / "config.yaml")


def test_offline_kernel_of_a_pretrained_config_asks_for_internet_or_a_weights_dataset(tmp_path, capsys):
    code, out = _build_preset(tmp_path, "resnet34_lovasz.yaml")
    assert code == 2
    line = _one_error_line(capsys)
    assert "an offline kernel cannot download" in line and "--internet" in line and "--weights-dataset" in line
    assert not out.exists()


def test_kernel_with_internet_lets_timm_download_the_encoder_weights(tmp_path):
    code, out = _build_preset(tmp_path, "resnet34_lovasz.yaml", "--internet")
    assert code == 0
    metadata = check_kernel_metadata(out)
    assert metadata["enable_internet"] is True and metadata["dataset_sources"] == []
    cfg = _embedded_config(out, tmp_path)
    assert cfg.model.pretrained and cfg.model.weights_path == ""


def test_kernel_with_a_weights_dataset_mounts_it_and_reads_the_weights_there(tmp_path):
    code, out = _build_preset(tmp_path, "gpu_best.yaml", "--weights-dataset", "alice/timm-resnet34-imagenet")
    assert code == 0
    metadata = check_kernel_metadata(out)
    assert metadata["dataset_sources"] == ["alice/timm-resnet34-imagenet"]
    assert metadata["enable_internet"] is False and metadata["competition_sources"] == [COMPETITION]
    cfg = _embedded_config(out, tmp_path)
    # where Kaggle mounts the dataset is found in the kernel (mounts.find_dataset), not assumed here
    assert cfg.model.pretrained and cfg.model.weights_path == ""
    kernel_module = runpy.run_path(str(out / "kernel.py"), run_name="kernel_under_test")
    assert kernel_module["WEIGHTS_DATASET"] == "alice/timm-resnet34-imagenet"


@pytest.mark.parametrize("extra, message", [
    (["--weights-dataset", "timm-resnet34-imagenet"], "expected a Kaggle dataset as OWNER/SLUG"),
    (["--weights-dataset", "alice/Bad Slug"], "expected a Kaggle dataset as OWNER/SLUG"),
    (["--internet", "--set", "model.weights_path=/home/me/resnet34.safetensors"], "the kernel cannot read"),
])
def test_kernel_weights_options_are_checked_in_one_line(tmp_path, capsys, extra, message):
    code, out = _build_preset(tmp_path, "resnet34_lovasz.yaml", *extra)
    assert code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def _seeded_resnet18_file(path: Path) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(11)
    weights = timm.create_model("resnet18", pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return weights


def check_dataset_metadata(folder: Path) -> dict:
    """What `kaggle datasets create` (kaggle 2.2, KaggleApi.dataset_create_new) requires of
    dataset-metadata.json."""
    metadata = json.loads((folder / "dataset-metadata.json").read_text())
    owner, slug = metadata["id"].split("/")
    assert owner and 6 <= len(slug) <= 50
    assert 6 <= len(metadata["title"]) <= 50
    assert len(metadata["licenses"]) == 1 and metadata["licenses"][0]["name"]
    return metadata


@pytest.mark.e2e
def test_weights_dataset_writes_the_weights_and_valid_metadata_then_creates_the_dataset(fake_kaggle, tmp_path,
                                                                                           capsys):
    import torch
    from safetensors.torch import load_file

    source = _seeded_resnet18_file(tmp_path / "downloads" / "model.safetensors")
    out = tmp_path / "weights"
    argv = ["kaggle", "weights-dataset", "--encoder", "resnet18", "--out", str(out), "--user", "alice",
            "--weights", str(tmp_path / "downloads"), "--push"]
    assert main(argv) == 0

    metadata = check_dataset_metadata(out)
    assert metadata["id"] == "alice/timm-resnet18-imagenet" and metadata["title"] == "timm resnet18 ImageNet weights"
    written = load_file(str(out / "resnet18.safetensors"))
    assert written.keys() == source.keys() and all(torch.equal(written[k], source[k]) for k in source)
    assert fake_kaggle.calls() == [["datasets", "create", "-p", str(out)]]
    assert "--weights-dataset alice/timm-resnet18-imagenet" in capsys.readouterr().out


def test_weights_dataset_downloads_through_timm_and_stops_in_one_line_offline(fake_kaggle, tmp_path, capsys,
                                                                               monkeypatch):
    import torch
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import load_file
    from timm.models import _builder

    hub_weights = _seeded_resnet18_file(tmp_path / "hub" / "model.safetensors")
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", lambda *a, **k: dict(hub_weights))
    argv = ["kaggle", "weights-dataset", "--encoder", "resnet18", "--out", str(tmp_path / "w"), "--user", "alice"]
    assert main(argv) == 0
    written = load_file(str(tmp_path / "w" / "resnet18.safetensors"))
    assert all(torch.equal(written[k], hub_weights[k]) for k in hub_weights)
    assert "timm/resnet18" in check_dataset_metadata(tmp_path / "w")["description"]
    assert fake_kaggle.calls() == [], "no --push, no Kaggle"
    capsys.readouterr()

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(_builder, "load_state_dict_from_hf", unreachable)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", unreachable)
    argv[argv.index(str(tmp_path / "w"))] = str(tmp_path / "offline")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "cannot download timm's ImageNet weights (LocalEntryNotFoundError" in line and "--weights" in line
    assert not (tmp_path / "offline").exists()


def test_weights_dataset_refused_by_kaggle_with_exit_0_still_fails(fake_kaggle, tmp_path, monkeypatch, capsys):
    _seeded_resnet18_file(tmp_path / "mine.safetensors")
    monkeypatch.setenv("FAKE_KAGGLE_DATASET", 'Dataset creation error: The requested slug "x" is already in use')
    argv = ["kaggle", "weights-dataset", "--encoder", "resnet18", "--out", str(tmp_path / "w"), "--user", "alice",
            "--weights", str(tmp_path / "mine.safetensors"), "--push"]
    assert main(argv) == 2
    assert "kaggle datasets create: Dataset creation error" in _one_error_line(capsys)


def test_dataset_metadata_passes_the_kaggle_clis_own_create_validation(tmp_path):
    """KaggleApi.dataset_create_new up to its first network call (the slug's status), in a
    subprocess with a throwaway HOME, as for the kernel metadata."""
    from pipeline.kaggle.weights import METADATA_FILE, dataset_metadata

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / METADATA_FILE).write_text(json.dumps(dataset_metadata("resnet34", "alice", "timm-resnet34-imagenet",
                                                                    "timm/resnet34.a1_in1k")))
    probe = textwrap.dedent(f"""
        from kaggle.api.kaggle_api_extended import KaggleApi
        class Reached(Exception):
            pass
        def stop(*args, **kwargs):
            raise Reached
        api = KaggleApi()
        api.config_values[api.CONFIG_NAME_USER] = "alice"
        api.dataset_status = stop
        api.build_kaggle_client = stop
        try:
            api.dataset_create_new({str(folder)!r})
        except Reached:
            print("VALIDATED")
    """)
    result = run_kaggle_api_probe(probe, tmp_path)
    assert "VALIDATED" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------- kernel push / status / output


def test_kernel_push_runs_kaggle_kernels_push_on_the_folder(fake_kaggle, tmp_path, capsys):
    folder = _built_kernel(tmp_path)
    assert main(["kaggle", "kernel", "push", "--dir", str(folder)]) == 0
    assert fake_kaggle.calls() == [["kernels", "push", "-p", str(folder)]]
    assert "pushed alice/tgs-salt-pipeline-train" in capsys.readouterr().out


def test_kernel_push_before_build_names_the_missing_metadata(fake_kaggle, tmp_path, capsys):
    assert main(["kaggle", "kernel", "push", "--dir", str(tmp_path / "kernels" / "train")]) == 2
    line = _one_error_line(capsys)
    assert "kernels/train/kernel-metadata.json: missing" in line and "kernel build" in line
    assert fake_kaggle.calls() == []


def test_kernel_push_refuses_the_placeholder_user(fake_kaggle, tmp_path, capsys):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "kernel-metadata.json").write_text((REPO / "kernels" / "train" / "kernel-metadata.json").read_text())
    assert main(["kaggle", "kernel", "push", "--dir", str(folder)]) == 2
    assert "placeholder" in _one_error_line(capsys)
    assert fake_kaggle.calls() == []


def test_kernel_push_error_reported_with_exit_0_still_fails(fake_kaggle, tmp_path, monkeypatch, capsys):
    folder = _built_kernel(tmp_path)
    monkeypatch.setenv("FAKE_KAGGLE_PUSH", "Kernel push error: Notebook not found")
    assert main(["kaggle", "kernel", "push", "--dir", str(folder)]) == 2
    assert _one_error_line(capsys).endswith("kaggle kernels push: Kernel push error: Notebook not found")


def test_kernel_status_asks_for_the_kernel_id(fake_kaggle, tmp_path, capsys):
    folder = _built_kernel(tmp_path)
    assert main(["kaggle", "kernel", "status", "--dir", str(folder)]) == 0
    assert fake_kaggle.calls() == [["kernels", "status", "alice/tgs-salt-pipeline-train"]]
    assert "kaggle kernel output" in capsys.readouterr().out


def test_kernel_status_error_is_one_line_with_the_failure_message(fake_kaggle, tmp_path, monkeypatch, capsys):
    folder = _built_kernel(tmp_path)
    monkeypatch.setenv("FAKE_KAGGLE_STATUS", "KernelWorkerStatus.ERROR")
    assert main(["kaggle", "kernel", "status", "--dir", str(folder)]) == 2
    line = _one_error_line(capsys)
    assert "alice/tgs-salt-pipeline-train failed: Your notebook tried to allocate more memory" in line


def test_kernel_output_downloads_and_reports_the_submission(fake_kaggle, tiny_data, tmp_path, capsys):
    folder = _built_kernel(tmp_path)
    _write_submission(fake_kaggle.serve / "submission.csv", tiny_data, "1 2")
    out = tmp_path / "kernel-output"
    assert main(["kaggle", "kernel", "output", "--dir", str(folder), "--out", str(out)]) == 0
    assert fake_kaggle.calls() == [["kernels", "output", "alice/tgs-salt-pipeline-train", "-p", str(out)]]
    assert (out / "submission.csv").read_bytes() == (fake_kaggle.serve / "submission.csv").read_bytes()
    assert f"submission: {out / 'submission.csv'}" in capsys.readouterr().out


# ---------------------------------------------------------------- the kernel's data on Kaggle


def _kaggle_input_mount(data: Path, mount: Path) -> Path:
    """Kaggle's /kaggle/input/<competition>: the CSVs plus train.zip and test.zip."""
    mount.mkdir(parents=True)
    with zipfile.ZipFile(competition_zip(data, mount.parent / "c.zip")) as bundle:
        bundle.extractall(mount)
    return mount


def _tree(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_kernel_data_from_zipped_input_unpacks_elsewhere_and_leaves_input_untouched(tiny_data, tmp_path):
    mount = _kaggle_input_mount(tiny_data, tmp_path / "input" / COMPETITION)
    before = _tree(mount)

    data = dataset.prepare_kernel_data(mount, tmp_path / "work" / "data")

    assert data == tmp_path / "work" / "data"
    assert _tree(mount) == before
    assert dataset.verify_dataset(data)["train"] == 16
    assert (data / "train.csv").read_bytes() == (tiny_data / "train.csv").read_bytes()


def _unpacked_competition(data: Path, folder: Path) -> Path:
    shutil.copytree(data, folder)
    return folder


@pytest.mark.parametrize("where", [f"competitions/{COMPETITION}", COMPETITION, f"competitions/{COMPETITION}/v2",
                                   "my-upload"])
@pytest.mark.parametrize("packed", ["zips", "unpacked"])
def test_the_competition_is_found_wherever_kaggle_mounts_it(tiny_data, tmp_path, where, packed):
    """Kaggle's 2026 mount (input/competitions/<slug>), the older one (input/<slug>), a folder
    one deeper, and under another name; as uploaded (train.zip/test.zip) or unpacked."""
    from pipeline.kaggle import mounts

    inputs = tmp_path / "input"
    (inputs / "datasets" / "alice" / "timm-resnet34-imagenet").mkdir(parents=True)  # another source beside it
    make = _kaggle_input_mount if packed == "zips" else _unpacked_competition
    folder = make(tiny_data, inputs / where)

    assert mounts.find_competition(inputs) == folder
    assert dataset.verify_dataset(dataset.prepare_kernel_data(folder, tmp_path / "work"))["train"] == 16


def test_a_folder_named_after_the_competition_wins_over_another_with_the_same_files(tiny_data, tmp_path):
    from pipeline.kaggle import mounts

    inputs = tmp_path / "input"
    _unpacked_competition(tiny_data, inputs / "aaa-some-other-copy")
    named = _unpacked_competition(tiny_data, inputs / "competitions" / COMPETITION)
    assert mounts.find_competition(inputs) == named


def test_no_competition_under_input_is_one_line_listing_what_is_there(tmp_path, capsys):
    from pipeline.kaggle import mounts

    inputs = tmp_path / "input"
    (inputs / "datasets" / "alice" / "timm-resnet34-imagenet").mkdir(parents=True)
    (inputs / "datasets" / "alice" / "timm-resnet34-imagenet" / "resnet34.safetensors").write_bytes(b"x")
    (inputs / "competitions" / "titanic").mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (inputs / "competitions" / "titanic" / name).write_text("id\n")
    with pytest.raises(PipelineError) as caught:
        mounts.find_competition(inputs)
    line = str(caught.value)
    assert "\n" not in line and f"add the competition '{COMPETITION}'" in line
    assert "competitions/titanic/ (2 files)" in line and "datasets/alice/timm-resnet34-imagenet/ (1 file)" in line
    with pytest.raises(PipelineError, match="it holds nothing"):
        mounts.find_competition(tmp_path / "empty-input")


@pytest.mark.parametrize("where", ["datasets/alice/timm-resnet34-imagenet", "timm-resnet34-imagenet"])
def test_the_weights_dataset_is_found_in_both_layouts(tmp_path, where):
    from pipeline.kaggle import mounts

    inputs = tmp_path / "input"
    (inputs / "datasets" / "bob" / "timm-resnet34-imagenet").mkdir(parents=True)  # someone else's, same slug
    (inputs / where).mkdir(parents=True, exist_ok=True)
    assert mounts.find_dataset(inputs, "alice/timm-resnet34-imagenet") == inputs / where
    with pytest.raises(PipelineError, match="dataset alice/timm-resnet99-imagenet not mounted.*it holds"):
        mounts.find_dataset(inputs, "alice/timm-resnet99-imagenet")


def test_kaggle_root_moves_only_by_its_variable():
    from pipeline.kaggle import mounts

    assert mounts.kaggle_root({}) == Path("/kaggle")
    assert mounts.kaggle_root({"TGS_KAGGLE_ROOT": "/tmp/k"}) == Path("/tmp/k")


def test_kernel_build_refuses_the_p100_in_one_line(tmp_path, capsys):
    code, out = _build_preset(tmp_path, "cpu_quick.yaml", "--gpu", "NvidiaTeslaP100")
    assert code == 2
    line = _one_error_line(capsys)
    assert "sm_60" in line and "T4 x2 or L4" in line and "--gpu NvidiaTeslaT4" in line
    assert not out.exists()


# The third-party modules the kernel's bundle imports, and the distribution in Kaggle's image
# (constraints-kaggle.txt) that provides each.
KAGGLE_IMAGE_MODULES = {
    "PIL": "pillow", "albumentations": "albumentations", "cv2": "opencv-python-headless",
    "matplotlib": "matplotlib", "numpy": "numpy", "pandas": "pandas", "safetensors": "safetensors",
    "scipy": "scipy", "sklearn": "scikit-learn", "timm": "timm", "torch": "torch", "tqdm": "tqdm",
    "yaml": "PyYAML",
}


def test_the_kernel_imports_nothing_kaggles_image_lacks():
    """Every import in the bundled package is the standard library, the package itself, or a
    module of a distribution pinned in constraints-kaggle.txt (Kaggle's image)."""
    import ast

    imported: dict[str, str] = {}
    for path in kernel.package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                imported.setdefault(name.split(".")[0], path.name)
    third_party = {m: f for m, f in imported.items() if m not in sys.stdlib_module_names and m != "pipeline"}
    assert set(third_party) <= set(KAGGLE_IMAGE_MODULES), third_party
    pinned = {line.split("==")[0].lower() for line in (REPO / "constraints-kaggle.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {KAGGLE_IMAGE_MODULES[m].lower() for m in third_party} <= pinned


def test_kernel_data_already_in_the_layout_is_used_in_place(tiny_data, tmp_path):
    assert dataset.prepare_kernel_data(tiny_data, tmp_path / "unused") == tiny_data
    assert not (tmp_path / "unused").exists()


def test_verify_counts_salt_masks(tiny_data):
    from pipeline.data import list_image_ids, read_masks

    masks = read_masks([tiny_data / "train" / "masks" / f"{i}.png" for i in list_image_ids(tiny_data / "train" / "masks")])
    counts = dataset.verify_dataset(tiny_data)
    assert counts == {"train": 16, "salt": int(np.any(masks, axis=(1, 2)).sum()), "test": 6}


# ---------------------------------------------------------------- end to end


def _run_kernel(folder: Path, data: Path, tmp_path: Path) -> Path:
    """Run the rendered kernel.py on a Kaggle-like root: the competition mounted as
    train.zip/test.zip plus CSVs at input/<competition> (the older layout; the rehearsal in
    test_kaggle_rehearsal.py runs today's), no network, started from an empty folder so the
    repo's own `pipeline` package cannot be imported by accident. Returns the working folder."""
    root = tmp_path / "kaggle"
    _kaggle_input_mount(data, root / "input" / COMPETITION)
    working = root / "working"
    env = dict(os.environ, TGS_KAGGLE_ROOT=str(root), TMPDIR=str(tmp_path / "tmp"), PYTHONPATH="")
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, str(folder / "kernel.py")], cwd=tmp_path / "tmp", env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"pipeline from {tmp_path / 'tmp'}" in result.stdout, "the bundled package ran, not the repo's"
    assert not (working / "data").exists() and not (working / "src").exists(), "the output holds results only"
    return working


@pytest.mark.slow
def test_kernel_py_trains_and_writes_a_valid_submission_offline(tiny_data, tmp_path):
    """The rendered kernel on a tiny synthetic dataset with a tiny config: `pipeline all` end to end."""
    from pipeline.submit import check_submission

    folder = _built_kernel(
        tmp_path, "--set", "name=kernel_smoke", "--set", "n_folds=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=8", "--set", "model.n_filters=4", "--set", "predict.tta=[none]",
        "--set", "train.threads=1",
    )
    working = _run_kernel(folder, tiny_data, tmp_path)
    assert check_submission(working / "submission.csv", tiny_data) == 6
    assert (working / "runs" / "kernel_smoke" / "tune.json").is_file()
    assert (working / "folds" / "folds.csv").is_file()


@pytest.mark.slow
def test_kernel_py_pseudo_round_trains_a_second_run_on_the_first_runs_test_labels(tiny_data, tmp_path):
    from pipeline.submit import check_submission

    folder = _built_kernel(
        tmp_path, "--set", "name=kernel_teacher", "--set", "n_folds=2", "--set", "train.epochs=1",
        "--set", "train.batch_size=8", "--set", "model.n_filters=4", "--set", "predict.tta=[none]",
        "--set", "train.threads=1", "--set", "pseudo.max_uncertain_share=1.0", "--pseudo-round",
    )
    working = _run_kernel(folder, tiny_data, tmp_path)
    for name in ("submission.csv", "submission_teacher.csv"):
        assert check_submission(working / name, tiny_data) == 6
    for fold in (0, 1):
        with np.load(working / "runs" / "kernel_teacher_pseudo" / f"fold{fold}" / "pseudo.npz") as saved:
            assert len(saved["ids"]) == 6  # every test image, at share 1.0
    assert (working / "runs" / "kernel_teacher" / "tune.json").is_file()


@pytest.mark.slow  # the whole sample through the kernel; tests/test_kaggle_rehearsal.py runs a real subset in the fast suite
def test_kernel_py_runs_on_the_real_sample_and_its_submission_passes_the_check(tgs_sample, tmp_path):
    """The rendered kernel in the simulated Kaggle layout on the real sample (3001 train, 1000
    test images): every train image loaded, folded, tuned on; every test image predicted with
    hflip TTA; submission.csv checked against the test folder. Training is cut to one epoch on
    96 images per fold so the test stays fast; the pipeline around it is the real one."""
    from pipeline.rle import read_rle_csv
    from pipeline.submit import check_submission

    folder = _built_kernel(
        tmp_path, "--set", "name=kernel_real", "--set", "n_folds=2", "--set", "train.epochs=1",
        "--set", "train.limit_train=96", "--set", "model.n_filters=4",
    )
    working = _run_kernel(folder, tgs_sample, tmp_path)
    assert check_submission(working / "submission.csv", tgs_sample) == 1000
    tuned = json.loads((working / "runs" / "kernel_real" / "tune.json").read_text())
    assert tuned["n_images"] == 3001  # the OOF covers every train image once
    predicted = json.loads((working / "runs" / "kernel_real" / "predict.json").read_text())
    assert predicted["n_images"] == 1000 and predicted["tta"] == ["none", "hflip"]
    assert len(read_rle_csv(working / "submission.csv")) == 1000
