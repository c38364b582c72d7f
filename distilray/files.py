"""Files other processes read (written to a private temp name and renamed, read tolerantly),
and where runs are stored (a local directory or an s3:// / gs:// URI).

Concurrent writers (Tune trials, replicas, a driver killed mid-write) each rename their own
complete file into place, so a reader sees the old content or the new, never half of either.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilray.errors import ConfigError, StorageError

STORAGE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.EFBIG: "the file is too large"}


def storage_error(path: str | Path, exc: OSError, what: str = "") -> StorageError:
    """One line naming the path, what the storage said, and what was kept."""
    reason = STORAGE_FAULTS.get(exc.errno or 0, exc.strerror or str(exc))
    detail = f" ({exc.strerror})" if exc.strerror and exc.strerror.lower() != reason else ""
    return StorageError(f"cannot write {what + ' ' if what else ''}{path}: {reason}{detail}; "
                        "what was there before is unchanged")


def storage_fault(exc: BaseException) -> OSError | None:
    """The OSError behind a refused write (pyarrow's carry no errno, only the text), or None."""
    if not isinstance(exc, OSError) or isinstance(exc, StorageError):
        return None
    if exc.errno in STORAGE_FAULTS:
        return OSError(exc.errno, os.strerror(exc.errno))
    text = str(exc)
    for code in STORAGE_FAULTS:
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def storage_failure(exc: BaseException) -> str | None:
    """The StorageError line inside an error's text (Ray wraps worker errors in text), if a write was refused."""
    for line in reversed(str(exc).splitlines()):
        head, sep, message = line.partition("StorageError: ")
        if sep and message.strip():
            return message.strip()
    return None


def _raise_storage_fault(path: Path, exc: OSError, what: str = "") -> None:
    fault = storage_fault(exc)
    if fault is not None:
        raise storage_error(path, fault, what) from exc


def _remove_quietly(path: Path) -> None:
    """Remove our temp file; on a read-only filesystem there is none to remove."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text`; the parent directory is created if missing."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        _raise_storage_fault(path, exc)
        raise
    finally:
        _remove_quietly(tmp)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_parquet_atomic(table: Any, path: str | Path) -> Path:
    """Write a pyarrow table as parquet via this writer's own temp file."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _raise_storage_fault(path, exc)
        raise
    finally:
        _remove_quietly(tmp)
    return path


def publish_dir_atomic(build: Callable[[Path], Any], target: Path, marker: str = "config.json") -> Path:
    """Build a directory in a temp sibling and rename it into place, unless it already exists.

    A directory counts as existing once it holds `marker`; a writer that loses the race to
    another finished one discards its own copy.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir_atomic(build: Callable[[Path], Any], target: Path) -> Path:
    """Build a directory in a temp sibling, then swap it for `target` (which may exist)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """JSON lines, skipping a line torn by a killed writer; [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_storage(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def check_storage_writable(storage: str, key: str = "train.storage_path") -> None:
    """Fail before any work when checkpoints could not be written (creating nothing: a dry run
    leaves no directory behind)."""
    if is_uri(storage):
        return
    existing = Path(storage)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        probe = existing / f".distilray-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}={storage!r} is not writable ({exc.strerror}); "
                          "choose a directory you can write to, or an s3:// / gs:// URI") from None
