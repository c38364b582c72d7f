"""Input files of a batch job: which files a spec names, and reading one without losing rows.

A spec is a file, a directory (every parquet/CSV/JSONL file below it), or a glob, local or
on `s3://` / `gs://` (pyarrow filesystems). Each file becomes one output shard, so a job
killed midway redoes only the files it had not finished. A text cell that is not a string
(a number, a list, null) is kept as null text with a row error instead of failing the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from distilray.data import FILE_FORMATS
from distilray.errors import DataError

ERROR_COLUMN = "error"
ROW_COLUMN = "__row"
"""Position of a row in its input file (dropped before writing; keeps the order checkable)."""


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    """As pyarrow opens it: a local path or a URI."""


def _filesystem(spec: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in spec:
        return pafs.FileSystem.from_uri(spec)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))


def _uri(spec: str, path: str) -> str:
    return f"{spec.split('://', 1)[0]}://{path}" if "://" in spec else path


def resolve_inputs(spec: str) -> list[InputFile]:
    """Every data file a spec names, sorted; a DataError naming the spec when there is none."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(spec)
    has_glob = any(c in path for c in "*?[")
    base = path[:min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] if has_glob else path
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and not has_glob:
            found = [path]
        elif info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = sorted(e.path for e in entries if e.type == pafs.FileType.File
                           and _suffix(e.path) in FILE_FORMATS
                           and not e.base_name.startswith(("_", "."))
                           and (not has_glob or PurePosixPath(e.path).match(path)))
        else:
            raise DataError(f"--input {spec}: no such file or directory")
    except OSError as exc:
        raise DataError(f"--input {spec}: cannot list it ({exc})") from None
    for p in found:
        if _suffix(p) not in FILE_FORMATS:
            raise DataError(f"{p}: unsupported file type '{_suffix(p)}' (use {', '.join(FILE_FORMATS)})")
    if not found:
        raise DataError(f"--input {spec}: no parquet, CSV or JSONL files found")
    return [InputFile(i, _uri(spec, p)) for i, p in enumerate(found)]


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _jsonl_rows(data: bytes, path: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _jsonl_table(rows: list[dict[str, Any]]) -> pa.Table:
    """JSON lines as columns: a column may mix types (a number among texts) without failing."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return pa.table({k: _json_column([row.get(k) for row in rows]) for k in names})


def _json_column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as JSON text
        return pa.array([v if isinstance(v, str) or v is None else json.dumps(v) for v in values],
                        pa.string())


def read_input(path: str, text_column: str | None = None) -> tuple[pa.Table, list[Any] | None]:
    """One input file as a table, and the text column's cells as they were in the file.

    For JSONL the cells come from the JSON itself, so a number stays a number (and gets a row
    error) even where the column is stored as text; None when `text_column` is not given.
    """
    fs, local = _filesystem(path)
    fmt = FILE_FORMATS.get(_suffix(path))
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(local, filesystem=fs)
            return table, _cells(table, text_column)
        with fs.open_input_stream(local) as stream:
            data = stream.read()
        if fmt == "csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(pa.BufferReader(data))
            return table, _cells(table, text_column)
        rows = _jsonl_rows(data, path)
        values = None if text_column is None else [row.get(text_column) for row in rows]
        return _jsonl_table(rows), values
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read as {fmt}: {msg}") from None


def _cells(table: pa.Table, column: str | None) -> list[Any] | None:
    return None if column is None or column not in table.column_names else table.column(column).to_pylist()


def input_columns(path: str) -> list[str]:
    """Column names of a file, reading no more than needed (parquet: the footer only)."""
    if FILE_FORMATS.get(_suffix(path)) == "parquet":
        import pyarrow.parquet as pq

        fs, local = _filesystem(path)
        try:
            return pq.read_schema(local, filesystem=fs).names
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    return read_input(path)[0].column_names


def check_inputs(files: Sequence[InputFile], text_column: str) -> None:
    """Fail before any model loads when a file is unreadable or lacks the text column."""
    for f in files:
        names = input_columns(f.path)
        if text_column not in names:
            raise DataError(f"{f.path}: no column '{text_column}' (have: {', '.join(names)}); "
                            f"set --text-column")
        if ROW_COLUMN in names:
            raise DataError(f"{f.path}: column '{ROW_COLUMN}' is reserved (distilray's row index); "
                            "rename it")


def text_errors(values: Sequence[Any], max_chars: int | None) -> list[str | None]:
    """Why each text cannot be classified, or None: not a string, empty, or too long."""
    out: list[str | None] = []
    for v in values:
        if not isinstance(v, str):
            out.append(f"text is {'missing' if v is None else type(v).__name__}, not a string")
        elif not v.strip():
            out.append("text is empty")
        elif max_chars is not None and len(v) > max_chars:
            out.append(f"text has {len(v)} characters (limit {max_chars}: predict.max_text_chars)")
        else:
            out.append(None)
    return out


def normalise_texts(table: pa.Table, values: list[Any], max_chars: int | None) -> tuple[pa.Table, list[str]]:
    """(table with the row index and an error column, texts to classify with '' where in error)."""
    errors = text_errors(values, max_chars)
    table = table.append_column(ROW_COLUMN, pa.array(range(table.num_rows), pa.int64()))
    table = table.append_column(ERROR_COLUMN, pa.array(errors, pa.string()))
    texts = [v if e is None else "" for v, e in zip(values, errors, strict=True)]
    return table, texts
