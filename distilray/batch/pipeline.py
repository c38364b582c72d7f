"""Batch inference on Ray Data: read → tokenise (tasks) → model actors → ordered results.

The read and tokenise stages carry only what inference needs (file, row, text ids, error);
the driver streams the results in input order (`preserve_order`) and joins them back onto
each input file's own rows when it writes that file's shard. The model stage is an
autoscaling actor pool (`concurrency=(min, max)`), with GPUs per actor when asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from distilray.batch.inputs import ERROR_COLUMN, ROW_COLUMN, normalise_texts, read_input
from distilray.config import PredictConfig
from distilray.data import tokenize_texts
from distilray.errors import RunFailed
from distilray.runtime import quiet_ray_data

log = logging.getLogger(__name__)

FILE_COLUMN = "__file"
IDS_COLUMN = "__ids"
TOKENS_COLUMN = "__tokens"
NODE_COLUMN = "__node"
PROGRESS_EVERY_S = 5.0
BLOCK_ROWS = 1024
ACTOR_START_TIMEOUT_S = 600
"""How long a job waits for its minimum model actors to start before failing."""
"""Rows per Ray Data block: small enough that the stages overlap, large enough to batch well."""


@dataclass(frozen=True)
class ModelSpec:
    """What every model actor loads: the checkpoint and how to run it."""

    checkpoint: str
    max_length: int
    backend: str = "torch"
    max_batch_tokens: int = 8192
    dtype: str = "float32"
    torch_threads: int = 1
    truncation: str = "head"


def read_files(batch: pa.Table, text_column: str, max_chars: int | None) -> Iterator[pa.Table]:
    """Read stage: the listed files' texts, row numbers and per-row errors, in blocks of
    BLOCK_ROWS rows so that tokenising and the model overlap and results stream."""
    for index, path in zip(batch.column("index").to_pylist(), batch.column("path").to_pylist(),
                           strict=True):
        table, texts = normalise_texts(*read_input(path, text_column), max_chars)
        yield from blocks(inference_columns(index, texts, table.column(ERROR_COLUMN)))


def blocks(table: pa.Table, rows: int | None = None) -> list[pa.Table]:
    """`table` in slices of at most `rows` rows (BLOCK_ROWS), at least one (possibly empty)."""
    rows = rows or BLOCK_ROWS
    return [table.slice(start, rows) for start in range(0, max(table.num_rows, 1), rows)]


def inference_columns(file_index: int, texts: list[str], errors: Any) -> pa.Table:
    return pa.table({FILE_COLUMN: pa.array([file_index] * len(texts), pa.int32()),
                     ROW_COLUMN: pa.array(range(len(texts)), pa.int64()),
                     "text": pa.array(texts, pa.string()), ERROR_COLUMN: errors})


@lru_cache(maxsize=2)
def _tokenizer(checkpoint: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def tokenize(batch: pa.Table, checkpoint: str, max_length: int, truncation: str = "head") -> pa.Table:
    """Tokenise stage: token ids (truncated as in training) replace the texts."""
    ids = tokenize_texts(_tokenizer(checkpoint), batch.column("text").to_pylist(), max_length,
                         truncation)
    batch = batch.drop_columns(["text"])
    batch = batch.append_column(IDS_COLUMN, pa.array(ids, pa.list_(pa.int32())))
    return batch.append_column(TOKENS_COLUMN, pa.array([len(r) for r in ids], pa.int32()))


class ModelActor:
    """Model stage: one loaded checkpoint per actor; texts in error get no prediction."""

    def __init__(self, spec: ModelSpec, use_gpu: bool = False):
        from distilray.serve.predictor import Predictor

        device = "cuda" if use_gpu else "cpu"
        self.predictor = Predictor(spec.checkpoint, max_length=spec.max_length, backend=spec.backend,
                                   max_batch_tokens=spec.max_batch_tokens, device=device,
                                   torch_threads=spec.torch_threads, dtype=spec.dtype)
        self.labels = self.predictor.labels
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = [i for i, e in enumerate(batch.column(ERROR_COLUMN).to_pylist()) if e is None]
        ids = batch.column(IDS_COLUMN).to_pylist()
        logits = np.zeros((batch.num_rows, len(self.labels)), dtype=np.float32)
        if ok:
            logits[ok] = self.predictor.logits_for_ids([ids[i] for i in ok])
        return prediction_columns(batch, logits, ok, self.labels, self.node)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def prediction_columns(batch: pa.Table, logits: np.ndarray, ok: list[int], labels: list[str],
                       node: str) -> pa.Table:
    """label / score / probabilities / logits for the rows in `ok`, nulls for the rows in error."""
    probs = softmax(logits) if len(logits) else logits
    n = batch.num_rows
    label: list[str | None] = [None] * n
    score: list[float | None] = [None] * n
    prob_rows: list[list[float] | None] = [None] * n
    for i in ok:
        best = int(probs[i].argmax())
        label[i], score[i], prob_rows[i] = labels[best], float(probs[i, best]), probs[i].tolist()
    return pa.table({
        FILE_COLUMN: batch.column(FILE_COLUMN), ROW_COLUMN: batch.column(ROW_COLUMN),
        "label": pa.array(label, pa.string()), "score": pa.array(score, pa.float32()),
        "probabilities": pa.array(prob_rows, pa.list_(pa.float32())),
        "logits": pa.array([None if r is None else logits[i].tolist() for i, r in enumerate(prob_rows)],
                           pa.list_(pa.float32())),
        ERROR_COLUMN: batch.column(ERROR_COLUMN), TOKENS_COLUMN: batch.column(TOKENS_COLUMN),
        NODE_COLUMN: pa.array([node] * n, pa.string())})


def infer(ds: ray.data.Dataset, spec: ModelSpec, cfg: PredictConfig) -> ray.data.Dataset:
    """The tokenise and model stages over a dataset of (file, row, text, error) rows."""
    use_gpu = cfg.gpus_per_actor > 0
    ds = ds.map_batches(tokenize, batch_format="pyarrow",
                        fn_kwargs={"checkpoint": spec.checkpoint, "max_length": spec.max_length,
                                   "truncation": spec.truncation})
    return ds.map_batches(
        ModelActor, batch_format="pyarrow", batch_size=cfg.batch_size,
        fn_constructor_kwargs={"spec": spec, "use_gpu": use_gpu},
        concurrency=(cfg.min_actors, cfg.max_actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor if use_gpu else None)


def ordered_results(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    """The dataset's batches in input order (Ray Data otherwise yields them as they finish).

    Set on the dataset's own context (Ray Data copies the process's context when a dataset is
    created); the job also waits for the minimum actor pool before dispatching, so work
    spreads over every actor and a pool the cluster can never place fails instead of hanging.
    """
    quiet_ray_data()
    ds.context.execution_options.preserve_order = True
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def check_order(rows: list[int], expected: int, what: str) -> None:
    """Refuse results that are not exactly rows 0..expected-1 in order."""
    if rows != list(range(expected)):
        raise RunFailed(f"{what}: {len(rows)} results for {expected} rows, not in input order")


class Progress:
    """A rows/s + ETA log line every few seconds; the caller prints the final line."""

    def __init__(self, total_rows: int | None, report: Callable[[str], None] = log.info):
        self.total, self.report = total_rows, report
        self.rows = 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = self.rows / max(now - self.started, 1e-9)
        eta = (f", ETA {(self.total - self.rows) / rate:.0f}s" if self.total and rate > 0 else "")
        of = f"/{self.total}" if self.total else ""
        self.report(f"predict: {self.rows}{of} rows, {rate:.1f} rows/s{eta}")

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started
