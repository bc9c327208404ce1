"""Atomic writes never leave a half-written file; locks name their holder."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from pipeline import fileio
from pipeline.errors import PipelineError


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "out.txt"
    fileio.write_text(target, "first")
    fileio.write_text(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["out.txt"]


def test_failure_inside_writer_keeps_previous_content(tmp_path):
    target = tmp_path / "ckpt.bin"
    fileio.write_bytes(target, b"good")

    def broken_writer(handle):
        handle.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        fileio.write_with(target, broken_writer)
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["ckpt.bin"]


def test_disk_full_is_one_line_and_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "sub.csv"
    fileio.write_text(target, "id,rle_mask\n")
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(PipelineError, match="No space left on device") as info:
        fileio.write_text(target, "id,rle_mask\nabc,1 1\n")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert target.read_text() == "id,rle_mask\n"
    assert os.listdir(tmp_path) == ["sub.csv"]


def _hold_lock(path, ready, release):
    with fileio.file_lock(path):
        ready.set()
        release.wait(10)


def test_nonblocking_lock_names_the_holder(tmp_path):
    path = tmp_path / "run.lock"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(PipelineError, match=rf"in use by pid {holder.pid}"):
            with fileio.file_lock(path, blocking=False, what="fold 0 of run x"):
                pass
    finally:
        release.set()
        holder.join(10)
    with fileio.file_lock(path, blocking=False):
        pass


def test_npy_rows_stream_the_array_read_npy_reads_and_refuse_what_it_refuses(tmp_path):
    """predict streams a fold's stored test_probs.npy piece by piece instead of a second full copy."""
    import numpy as np

    from pipeline.fileio import iter_npy_rows, read_npy, read_npy_shape, write_npy

    array = np.random.default_rng(0).random((10, 7, 7)).astype(np.float16)
    path = tmp_path / "probs.npy"
    write_npy(path, array)
    pieces = list(iter_npy_rows(path, 4))
    assert [start for start, _ in pieces] == [0, 4, 8] and [len(p) for _, p in pieces] == [4, 4, 2]
    assert np.array_equal(np.concatenate([p for _, p in pieces]), read_npy(path))
    shape, dtype = read_npy_shape(path)
    assert shape == (10, 7, 7) and dtype == np.float16
    path.write_bytes(path.read_bytes()[:-5])  # truncated: both readers name the file
    for read in (read_npy, read_npy_shape, lambda p: list(iter_npy_rows(p, 4))):
        with pytest.raises(PipelineError, match="truncated or damaged"):
            read(path)
