"""`distilray predict --input` and `distilray evaluate`: the driver side of batch inference.

Everything that can fail on the input (no files, an unreadable file, a missing column, an
output that already holds another job) fails before the cluster or any model is touched.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from distilray import __version__, tracking
from distilray.batch import evaluation, shards
from distilray.batch.inputs import (
    ERROR_COLUMN,
    ROW_COLUMN,
    InputFile,
    check_inputs,
    read_input,
    resolve_inputs,
)
from distilray.batch.pipeline import (
    FILE_COLUMN,
    NODE_COLUMN,
    TOKENS_COLUMN,
    ModelSpec,
    Progress,
    blocks,
    check_order,
    infer,
    inference_columns,
    ordered_results,
    read_files,
)
from distilray.checkpoints import check_servable, checkpoint_info, read_meta, resolve_checkpoint_dir
from distilray.config import Config, DataConfig
from distilray.files import write_text_atomic
from distilray.runtime import connect_ray


def model_spec(cfg: Config, checkpoint: str) -> tuple[ModelSpec, dict[str, Any]]:
    """The checkpoint to load (a run or experiment directory means its best) and its identity."""
    path = check_servable(resolve_checkpoint_dir(checkpoint))
    info = checkpoint_info(path, full_sha256=True)
    meta = read_meta(path)
    max_length = meta.get("max_length") or cfg.data.max_length
    p = cfg.predict
    spec = ModelSpec(str(path), max_length=max_length, backend=p.backend,
                     max_batch_tokens=p.max_batch_tokens, dtype=p.dtype,
                     torch_threads=max(1, int(p.cpus_per_actor)),
                     truncation=meta.get("truncation") or cfg.data.truncation)
    return spec, info


def _connect(cfg: Config) -> None:
    p = cfg.predict
    connect_ray(min_cpus=p.max_actors * p.cpus_per_actor + 1)


def _file_dataset(files: list[InputFile], cfg: Config) -> ray.data.Dataset:
    items = [{"index": f.index, "path": f.path} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(read_files, batch_format="pyarrow", batch_size=1,
                          fn_kwargs={"text_column": cfg.predict.text_column,
                                     "max_chars": cfg.predict.max_text_chars})


def _by_file(batches: Iterable[pa.Table]) -> Iterable[tuple[int, pa.Table]]:
    """Group the ordered result stream into one table per input file."""
    current, parts = None, []
    for batch in batches:
        column = batch.column(FILE_COLUMN)
        for index in pc.unique(column).to_pylist():  # in order of first appearance
            if current is not None and index != current:
                yield current, pa.concat_tables(parts)
                parts = []
            current = index
            parts.append(batch.filter(pc.equal(column, index)))
    if current is not None:
        yield current, pa.concat_tables(parts)


def predict_files(cfg: Config, checkpoint: str, input_spec: str, output: str,
                  resume: bool = False) -> dict[str, Any]:
    """Score every row of the input files into one output shard per file; returns the summary."""
    out_dir = Path(output).expanduser().resolve()
    fmt = cfg.predict.output_format
    files = resolve_inputs(input_spec)
    check_inputs(files, cfg.predict.text_column)
    shards.check_output(out_dir, resume)
    spec, info = model_spec(cfg, checkpoint)
    todo = [f for f in files if not shards.shard_done(out_dir, f.index, fmt, f.path, info["sha256"])]
    _connect(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_temp_files(out_dir)
    progress = Progress(None)
    nodes: dict[str, int] = {}
    by_index = {f.index: f for f in todo}
    written = set()
    if todo:
        results = ordered_results(infer(_file_dataset(todo, cfg), spec, cfg.predict))
        for index, predictions in _by_file(_counted(results, progress, nodes)):
            _write(out_dir, by_index[index], predictions, cfg, fmt, info["sha256"])
            written.add(index)
    for f in todo:  # an empty input file yields no rows, but still gets its (empty) shard
        if f.index not in written:
            _write(out_dir, f, _empty_predictions(), cfg, fmt, info["sha256"])
    return _summarise(out_dir, files, fmt, info, progress, nodes, resumed=len(files) - len(todo))


def _counted(results: Iterable[pa.Table], progress: Progress, nodes: dict[str, int]) -> Iterable[pa.Table]:
    for batch in results:
        for node in batch.column(NODE_COLUMN).to_pylist():
            nodes[node] = nodes.get(node, 0) + 1
        progress.update(batch.num_rows)
        yield batch


def _empty_predictions() -> pa.Table:
    return pa.table({ROW_COLUMN: pa.array([], pa.int64()), "label": pa.array([], pa.string()),
                     "score": pa.array([], pa.float32()),
                     "probabilities": pa.array([], pa.list_(pa.float32())),
                     ERROR_COLUMN: pa.array([], pa.string())})


def _write(out_dir: Path, f: InputFile, predictions: pa.Table, cfg: Config, fmt: str, sha: str) -> None:
    table = read_input(f.path)[0]
    shards.write_shard(out_dir, f.index, fmt, shards.merge_predictions(table, predictions, f.path),
                       f.path, sha)


def _summarise(out_dir: Path, files: list[InputFile], fmt: str, info: dict[str, Any],
               progress: Progress, nodes: dict[str, int], resumed: int) -> dict[str, Any]:
    records = [shards.read_record(out_dir, f.index, fmt) for f in files]
    rows = sum(r["rows"] for r in records)
    errors = sum(r["errors"] for r in records)
    elapsed = progress.elapsed_s
    summary = {
        "rows": rows, "predicted": rows - errors, "errors": errors, "files": len(files),
        "shards_resumed": resumed, "rows_this_run": progress.rows,
        "rows_per_s": round(progress.rows / elapsed, 1) if elapsed > 0 else None,
        "wall_time_s": round(elapsed, 1), "rows_per_node": nodes,
        "checkpoint": {"id": info["id"], "path": info["path"], "sha256": info["sha256"]},
        "output": str(out_dir), "format": fmt, "shards": records, "distilray": __version__,
    }
    shards.write_summary(out_dir, summary)
    return summary


# --------------------------------------------------------------------------- evaluate


def data_fingerprint(table: pa.Table) -> str:
    """sha256 over the (text, label) rows in order: the same rows give the same hash."""
    digest = hashlib.sha256()
    for text, label in zip(table.column("text").to_pylist(), table.column("label").to_pylist(),
                           strict=True):
        digest.update(json.dumps([text, label], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def load_eval_split(cfg: Config, data_spec: str, split: str) -> tuple[pa.Table, str]:
    """The labelled rows `distilray train` would evaluate on for this data spec and split."""
    from dataclasses import replace

    from distilray.data import load_splits

    data_cfg: DataConfig = replace(cfg.data, dataset=data_spec, eval_split=split)
    splits = load_splits(data_cfg, cfg.model.num_labels)
    return splits.eval, splits.source


def evaluate_checkpoint(cfg: Config, checkpoint: str, data_spec: str, split: str = "validation",
                        output: str | None = None) -> dict[str, Any]:
    """Score a labelled split with the batch pipeline; write eval.json and eval.md."""
    spec, info = model_spec(cfg, checkpoint)
    table, source = load_eval_split(cfg, data_spec, split)
    _connect(cfg)
    started = time.monotonic()
    probs, lengths = _score_table(table, spec, cfg)
    elapsed = time.monotonic() - started
    labels = [str(x) for x in read_meta(info["path"]).get("label_names") or cfg.model.label_names]
    report = evaluation.evaluation_metrics(probs, table.column("label").to_numpy(), lengths, labels)
    report.update(
        checkpoint={"id": info["id"], "path": info["path"], "sha256": info["sha256"]},
        data={"source": source, "spec": data_spec, "split": split, "rows": table.num_rows,
              "sha256": data_fingerprint(table)},
        max_length=spec.max_length, backend=spec.backend, distilray=__version__,
        rows_per_s=round(table.num_rows / elapsed, 1) if elapsed > 0 else None,
        wall_time_s=round(elapsed, 2))
    out_dir = Path(output).expanduser() if output else Path(info["path"])
    report["files"] = {"json": str(out_dir / "eval.json"), "md": str(out_dir / "eval.md")}
    write_text_atomic(out_dir / "eval.json", evaluation.eval_json(report))
    write_text_atomic(out_dir / "eval.md", evaluation.render_markdown(report))
    if run_id := tracking.log_evaluation(cfg.track, report, out_dir / "eval.json"):
        report["mlflow_run_id"] = run_id  # tracking on: the evaluation's MLflow run
    return report


def _score_table(table: pa.Table, spec: ModelSpec, cfg: Config) -> tuple[Any, Any]:
    """(probabilities, token lengths) of every row, in order, through the batch pipeline."""
    import numpy as np

    texts = table.column("text").to_pylist()
    rows = inference_columns(0, texts, pa.array([None] * len(texts), pa.string()))
    ds = ray.data.from_arrow(blocks(rows))
    probs, lengths, order = [], [], []
    for batch in ordered_results(infer(ds, spec, cfg.predict)):
        probs += batch.column("probabilities").to_pylist()
        lengths += batch.column(TOKENS_COLUMN).to_pylist()
        order += batch.column(ROW_COLUMN).to_pylist()
    check_order(order, table.num_rows, "evaluation")
    return np.asarray(probs, dtype=np.float64), np.asarray(lengths)
