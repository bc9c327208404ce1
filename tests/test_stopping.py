"""SIGTERM stops a command as Ctrl-C does: one line naming the command that resumes, exit 143,
the run's log.txt closed with its exit line; a parent stopping, whyever, stops its fold
processes first, and a fold process whose parent was SIGKILLed stops too (pipeline/stopping.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import train_folds
from pipeline.cli import main
from pipeline.errors import Terminated
from pipeline.rundir import RUN_LOG_FILE, FoldDir, read_log
from pipeline.stopping import PARENT_PID_ENV, _StopHandler, stop_on_signals, stopped_line
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


def log_tail(run: Path, count: int) -> list[str]:
    return [line[21:] for line in (run / RUN_LOG_FILE).read_text(encoding="utf-8").splitlines()[-count:]]


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (one that ended, its parent not yet told)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children_of(pid: int) -> list[int]:
    """The processes `pid` started that still run (every thread's children: a pool thread starts them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


@pytest.mark.parametrize("signum, code, line", [
    (signal.SIGTERM, 143, "terminated (SIGTERM) during tune; resume with: python -m pipeline tune --run {run}"),
    (signal.SIGINT, 130, "interrupted (SIGINT) during tune; resume with: python -m pipeline tune --run {run}"),
])
def test_a_signal_stops_the_command_in_one_line_with_its_status_and_the_log_exit_line(tmp_path, monkeypatch, capsys,
                                                                                      signum, code, line):
    import pipeline.tune

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)

    def signalled(run_dir):
        os.kill(os.getpid(), signum)  # as `kill`, docker stop or a time limit sends it
        time.sleep(10)  # the handler raises in here
        raise AssertionError("the signal did not stop the command")

    monkeypatch.setattr(pipeline.tune, "tune_run", signalled)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    started = time.monotonic()
    assert main(["tune", "--run", str(run)]) == code
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err == line.format(run=run) + "\n"
    assert log_tail(run, 2)[0] == line.format(run=run)
    assert re.fullmatch(rf"exit {code} after \d+\.\d s", log_tail(run, 1)[0])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # given back


def test_a_second_sigterm_while_stopping_is_ignored_a_second_ctrl_c_is_not():
    handler = _StopHandler()
    with pytest.raises(Terminated):
        handler(signal.SIGTERM, None)
    handler(signal.SIGTERM, None)  # a fold process gets the group's SIGTERM and then its parent's
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)
    first_ctrl_c = _StopHandler()
    with pytest.raises(KeyboardInterrupt) as raised:
        first_ctrl_c(signal.SIGINT, None)
    assert not isinstance(raised.value, Terminated)
    first_ctrl_c(signal.SIGTERM, None)  # the parent's SIGTERM after a Ctrl-C that reached the group


def test_the_line_names_the_command_that_goes_on_and_a_fold_process_points_at_its_parent():
    assert stopped_line(Terminated(), ["all", "--config", "my run.yaml"]) == \
        "terminated (SIGTERM) during all; resume with: python -m pipeline all --config 'my run.yaml'"
    assert stopped_line(KeyboardInterrupt(), ["train", "--config", "c.yaml", "--restart"]) == \
        "interrupted (SIGINT) during train; rerun with: python -m pipeline train --config c.yaml --restart"
    assert stopped_line(Terminated(), ["train", "--folds", "0", "--fold-worker"], fold_process=True) == \
        "terminated (SIGTERM): a fold process; the command that started it resumes the fold"


def test_an_ignored_sigterm_stays_ignored_and_other_threads_set_nothing():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # started under nohup-like settings
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    seen = []

    def elsewhere():
        with stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_a_forked_child_keeps_the_default_sigterm():
    """A DataLoader worker forked while the handler is in place dies on SIGTERM as before,
    rather than raising Terminated in a process with no CLI above it."""
    import multiprocessing

    with stop_on_signals():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)  # in its sleep, where the inherited handler would raise
        child.terminate()
        child.join(10)
    assert child.exitcode == -signal.SIGTERM


SLEEPER = "import sys, time; open(sys.argv[1], 'w').write('started'); time.sleep(60)"
DEAF = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').write('started'); time.sleep(60)")


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_a_parent_stopped_by_sigterm_stops_its_fold_processes_even_one_deaf_to_it(synth_data, tmp_path, monkeypatch,
                                                                                     capsys):
    """Fold 0 stops on SIGTERM; fold 1 ignores it and is killed after the grace; none is left,
    no failure is reported for either, and the parent's exception goes on up."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(train_folds, "STOP_GRACE_SECONDS", 0.5)
    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1]", "run.parallel_folds=true", "run.fold_workers=2")
    monkeypatch.setattr(train_folds, "fold_command", lambda cfg, fold, threads, **kw: [
        sys.executable, "-c", SLEEPER if fold == 0 else DEAF, str(tmp_path / f"started{fold}")])
    pids = []
    earlier = set(children_of(os.getpid()))  # what earlier tests in this process left running

    def sigterm_once_both_run():
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"started{fold}").exists() for fold in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.02)
        pids.extend(set(children_of(os.getpid())) - earlier)
        os.kill(os.getpid(), signal.SIGTERM)

    with stop_on_signals():
        threading.Thread(target=sigterm_once_both_run, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(Terminated):
            train_folds.train_folds_in_parallel(cfg)
    assert time.monotonic() - started < 20
    assert len(pids) == 2 and not any(is_running(pid) for pid in pids)
    assert "failed" not in capsys.readouterr().out


@pytest.mark.skipif(not LINUX, reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_fold_process_stops_when_its_parent_is_sigkilled(tmp_path):
    """What a SIGKILLed `train --parallel-folds` leaves: its fold processes get SIGTERM from Linux."""
    out = tmp_path / "fold.out"
    fold = textwrap.dedent("""
        import sys, time
        from pipeline.errors import Terminated
        from pipeline.stopping import stop_on_signals, stop_with_parent
        with stop_on_signals():
            try:
                stop_with_parent()
                print("running", flush=True)
                time.sleep(60)
            except Terminated:
                print("terminated", flush=True)
                sys.exit(143)
    """)
    parent = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {fold!r}], "
              f"stdout=open({str(out)!r}, 'w'), env=dict(os.environ, {PARENT_PID_ENV}=str(os.getpid()))); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with subprocess.Popen([sys.executable, "-c", parent], env=env) as process:
        deadline = time.monotonic() + 30
        while "running" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)
        process.kill()
    deadline = time.monotonic() + 10
    while out.read_text().split() != ["running", "terminated"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.read_text().split() == ["running", "terminated"]
    # a parent gone before the fold process asked: it stops at once, no signal would ever come
    late = subprocess.run([sys.executable, "-c", "from pipeline.stopping import stop_with_parent; stop_with_parent()"],
                          env=dict(env, **{PARENT_PID_ENV: "1"}), capture_output=True, text=True, timeout=30)
    assert late.returncode != 0 and "Terminated" in late.stderr


@pytest.mark.e2e
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_sigterm_to_train_with_parallel_folds_stops_all_in_one_line_and_the_same_command_resumes(synth_data, tmp_path):
    """A real `python -m pipeline train` with 2 fold processes, SIGTERMed once both have a last.pt:
    status 143, its one line, log.txt's exit line, no fold process left, and the same command
    resumes both folds from their last.pt and finishes them."""
    from pipeline.config import save_config

    cfg = tiny_config(synth_data, tmp_path, "folds=[0,1]", "train.epochs=3", "run.threads=1",
                      "run.parallel_folds=true", "run.fold_workers=2")
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(config)]
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="")
    folders = [FoldDir.of(cfg, fold) for fold in (0, 1)]
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as parent:
        deadline = time.monotonic() + 60
        while not all(folder.last.exists() for folder in folders):
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
            time.sleep(0.05)
        workers = children_of(parent.pid)
        parent.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = parent.communicate(timeout=30)
    seconds = time.monotonic() - stopped
    assert parent.returncode == 143, err[-2000:]
    line = f"terminated (SIGTERM) during train; resume with: python -m pipeline train --config {config}"
    assert err.strip().splitlines() == [line]
    assert log_tail(cfg.run_dir, 2)[0] == line
    assert re.fullmatch(r"exit 143 after \d+\.\d s", log_tail(cfg.run_dir, 1)[0])
    assert len(workers) == 2 and not any(is_running(pid) for pid in workers)
    assert seconds < 10, f"{seconds:.1f} s to stop"
    assert "failed" not in out
    for folder in folders:  # stopped mid-training, each with its own line
        assert not folder.done.exists()
        assert folder.train_out.read_text().strip().splitlines()[-1] == \
            "terminated (SIGTERM): a fold process; the command that started it resumes the fold"

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    for folder in folders:
        assert folder.done.exists()
        assert re.search(r"resuming at epoch [23]/3", folder.train_out.read_text())
        assert [int(row["epoch"]) for row in read_log(folder.log)] == [1, 2, 3]
