"""Writes the storage refuses, on real small filesystems: a full tmpfs and a read-only one.

Mounting needs root (CAP_SYS_ADMIN); without it these tests skip and say so. Each write must
fail with one line naming the path, leave what was there intact (no torn file, no temp file)
and succeed again once space is freed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest

from distilray.batch import shards
from distilray.errors import ConfigError, StorageError
from distilray.files import (
    check_storage_writable,
    storage_failure,
    storage_fault,
    write_json_atomic,
    write_text_atomic,
)


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def mounted_tmpfs(mnt: Path, size: str):
    """Mount a tmpfs of `size` at `mnt` for the duration (a generator for fixtures)."""
    mnt.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    out = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        remount(mnt, "rw")
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, mode: str, within_s: float = 10.0) -> None:
    """Remount `mnt` rw or ro. The kernel refuses `ro` (busy) while a file there is open for
    writing — a training log being appended to — so it is retried until that write ends."""
    deadline = time.monotonic() + within_s
    while (out := _mount("-o", f"remount,{mode}", str(mnt))).returncode != 0:
        assert time.monotonic() < deadline and "busy" in out.stderr, out.stderr
        time.sleep(0.02)


@pytest.fixture
def small_fs(tmp_path):
    """A 512 KiB tmpfs at tmp_path/fs, unmounted afterwards."""
    yield from mounted_tmpfs(tmp_path / "fs", "512k")


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem up to the last byte (or `leave` bytes); returns the filler (delete it
    to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 512, 1):  # unbuffered: every byte that fits is written
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".")]


def test_full_disk_write_names_the_path_and_keeps_the_old_file(small_fs):
    target = small_fs / "result.json"
    write_json_atomic(target, {"step": 10})
    filler = fill(small_fs)
    with pytest.raises(StorageError) as info:
        write_text_atomic(target, "x" * 200_000)
    assert str(info.value) == (f"cannot write {target}: the disk is full (No space left on device); "
                               "what was there before is unchanged")
    assert "\n" not in str(info.value) and isinstance(info.value, OSError)
    assert target.read_text().replace(" ", "").replace("\n", "") == '{"step":10}'
    assert temp_files(small_fs) == []
    filler.unlink()  # space freed: the same write goes through
    write_text_atomic(target, "x" * 200_000)
    assert target.stat().st_size == 200_000


def test_read_only_storage_names_the_path(small_fs):
    target = small_fs / "metrics.json"
    write_json_atomic(target, {"ok": 1})
    remount(small_fs, "ro")
    with pytest.raises(StorageError, match=rf"^cannot write {target}: the file system is read-only"):
        write_json_atomic(target, {"ok": 2})
    with pytest.raises(ConfigError, match=r"train.storage_path=.* is not writable \(Read-only file system\)"):
        check_storage_writable(str(small_fs / "runs"))
    assert '"ok": 1' in target.read_text()


def _shard_table(n: int, offset: int = 0) -> pa.Table:
    return pa.table({"text": [f"row {i} " * 40 for i in range(offset, offset + n)],
                     "label": ["positive"] * n, "score": [0.9] * n,
                     "probabilities": [[0.1, 0.9]] * n, "error": pa.nulls(n, pa.string())})


def test_predict_output_full_disk_fails_one_shard_and_resume_finishes(small_fs):
    out = small_fs / "predictions"
    first = shards.write_shard(out, 0, "parquet", _shard_table(50), "in/part0.parquet", "abc")
    filler = fill(small_fs)
    with pytest.raises(StorageError, match=rf"^cannot write {out / 'part-00001.parquet'}: the disk is full"):
        shards.write_shard(out, 1, "parquet", _shard_table(2000, 50), "in/part1.parquet", "abc")
    # The finished shard still verifies; the failed one left nothing a --resume would trust.
    assert shards.shard_done(out, 0, "parquet", "in/part0.parquet", "abc")
    assert not shards.shard_done(out, 1, "parquet", "in/part1.parquet", "abc")
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00000.parquet.json"]
    filler.unlink()
    shards.write_shard(out, 1, "parquet", _shard_table(2000, 50), "in/part1.parquet", "abc")
    assert shards.shard_done(out, 1, "parquet", "in/part1.parquet", "abc")
    assert shards.read_record(out, 0, "parquet") == first


def test_pyarrow_errors_without_errno_are_recognised():
    fault = storage_fault(OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"))
    assert fault is not None and fault.errno == 28
    assert storage_fault(OSError("connection reset")) is None
    assert storage_fault(ValueError("No space left on device")) is None


def test_storage_failure_line_is_found_in_a_ray_wrapped_error():
    wrapped = ("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
               "call last):\n  File \"loop.py\", line 1\ndistilray.errors.StorageError: cannot write "
               "/data/run/checkpoint-step0000020: the disk is full (No space left on device); what was "
               "there before is unchanged\n")
    assert storage_failure(RuntimeError(wrapped)) == (
        "cannot write /data/run/checkpoint-step0000020: the disk is full (No space left on device); "
        "what was there before is unchanged")
    assert storage_failure(RuntimeError("RuntimeError: boom")) is None
