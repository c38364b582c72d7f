"""Output shards of a batch job: one per input file, written atomically, verified on resume.

`part-NNNNN.<fmt>` holds the input file's rows in their order with `label`, `score`,
`probabilities` and `error` added; `part-NNNNN.<fmt>.json` beside it (written after it)
records the input, the row count, the checkpoint and the shard's sha256. A shard counts as
done only when its record is there and the sha256 still matches, so a job killed while
writing leaves nothing a rerun would trust. `_SUCCESS.json` is written last of all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from distilray.errors import DataError
from distilray.files import sha256_file, write_json_atomic, write_parquet_atomic, write_text_atomic

SUMMARY_FILE = "_SUCCESS.json"
OUTPUT_COLUMNS = ("label", "score", "probabilities", "error")


def shard_name(index: int, fmt: str) -> str:
    return f"part-{index:05d}.{fmt}"


def _record_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def shard_done(output: Path, index: int, fmt: str, source: str, checkpoint_sha: str) -> bool:
    """Whether a verified shard of this input, from this checkpoint, is already there."""
    shard = output / shard_name(index, fmt)
    record_path = _record_path(shard)
    if not shard.exists() or not record_path.exists():
        return False
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    return (record.get("input") == source and record.get("checkpoint_sha256") == checkpoint_sha
            and record.get("sha256") == sha256_file(shard))


def output_name(name: str, input_columns: list[str]) -> str:
    """An output column's name: as is, or `predicted_<name>` where the input already has it."""
    return f"predicted_{name}" if name in input_columns else name


def merge_predictions(table: pa.Table, predictions: pa.Table, source: str) -> pa.Table:
    """The input rows with the prediction columns appended, checking nothing was lost or reordered.

    An input column is never replaced: a labelled file's own `label` stays, and the model's
    goes in `predicted_label` (likewise score, probabilities, error).
    """
    rows = predictions.column("__row").to_pylist()
    if rows != list(range(table.num_rows)):
        raise DataError(f"{source}: {len(rows)} predictions for {table.num_rows} rows "
                        "(rows lost or reordered; rerun with --resume)")
    names = table.column_names
    for name in OUTPUT_COLUMNS:
        table = table.append_column(output_name(name, names), predictions.column(name))
    return table


def write_shard(output: Path, index: int, fmt: str, table: pa.Table, source: str,
                checkpoint_sha: str) -> dict[str, Any]:
    """Write one shard, then its record; returns the record."""
    shard = output / shard_name(index, fmt)
    if fmt == "parquet":
        write_parquet_atomic(table, shard)
    else:
        lines = (json.dumps(row, ensure_ascii=False) for row in table.to_pylist())
        write_text_atomic(shard, "".join(line + "\n" for line in lines))
    error_column = table.column_names[-1]  # merge_predictions appends error last
    predicted = table.column(error_column).null_count  # rows without an error
    record = {"input": source, "shard": shard.name, "rows": table.num_rows,
              "errors": table.num_rows - predicted, "checkpoint_sha256": checkpoint_sha,
              "sha256": sha256_file(shard)}
    write_json_atomic(_record_path(shard), record)
    return record


def read_record(output: Path, index: int, fmt: str) -> dict[str, Any]:
    return json.loads(_record_path(output / shard_name(index, fmt)).read_text())


def remove_stale_temp_files(output: Path) -> list[Path]:
    """Delete the temp files a killed writer of this output left (`.part-*…tmp`): one job
    writes an output directory at a time, so none of them is being written now."""
    stale = sorted(output.glob(".part-*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_output(output: Path, resume: bool) -> None:
    """Refuse to mix a new job into an old one's output unless it is a --resume."""
    if resume or not output.exists():
        return
    if any(output.glob("part-*")) or (output / SUMMARY_FILE).exists():
        raise DataError(f"--output {output} already holds results; pass --resume to finish that "
                        "job, or choose another --output")


def write_summary(output: Path, summary: dict[str, Any]) -> Path:
    return write_json_atomic(output / SUMMARY_FILE, summary)
