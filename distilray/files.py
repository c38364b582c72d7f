"""Files other processes read (written to a private temp name and renamed, read tolerantly),
and where runs are stored (a local directory or an s3:// / gs:// URI).

Concurrent writers (Tune trials, replicas, a driver killed mid-write) each rename their own
complete file into place, so a reader sees the old content or the new, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distilray.errors import ConfigError


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text`; the parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str))


def write_parquet_atomic(table: Any, path: str | Path) -> Path:
    """Write a pyarrow table as parquet via this writer's own temp file."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
