"""The teacher: where it is, the frozen model, and its logits for every training row.

With `distill.teacher_logits=precomputed` the logits are computed once by the batch-inference
pipeline of `distilray predict` (Ray Data tokenise tasks and model actors), cached as parquet under `<storage>/.teacher-logits/`, and
carried with the training rows; with `on_the_fly` each worker runs `load_teacher`'s model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from distilray.batch.inputs import ROW_COLUMN
from distilray.batch.pipeline import (
    ModelSpec,
    blocks,
    check_order,
    infer,
    inference_columns,
    ordered_results,
)
from distilray.checkpoints import WEIGHT_FILES, resolve_checkpoint_dir
from distilray.config import Config
from distilray.errors import CheckpointError
from distilray.files import is_uri, sha256_file, write_parquet_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distilray.train.run import PreparedRun

log = logging.getLogger(__name__)

LOGITS_CACHE_DIR = ".teacher-logits"


def resolve_teacher_dir(teacher: str) -> Path:
    """A checkpoint directory, or a `distilray train` run directory (its best checkpoint)."""
    path = Path(teacher).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"distill.teacher={teacher!r}: no such directory; pass --teacher with a "
                              "checkpoint written by distilray train (e.g. RUN_DIR/checkpoint-step…)")
    path = resolve_checkpoint_dir(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"distill.teacher={teacher!r} has no config.json: not a Hugging Face "
                              "checkpoint (nor a run directory with a best checkpoint in result.json)")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise CheckpointError(f"distill.teacher={teacher!r} has no model.safetensors: the checkpoint "
                              "is incomplete; point to a finished checkpoint")
    return path.resolve()


def teacher_config(teacher_dir: Path) -> Any:
    """The teacher's Hugging Face config (architecture, depth, width, labels)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(teacher_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the teacher's config in {teacher_dir}: {exc}") from None


def load_teacher(cfg: Config) -> PreTrainedModel:
    """The frozen teacher: eval mode (no dropout), no gradients."""
    from transformers import AutoModelForSequenceClassification

    teacher_dir = resolve_teacher_dir(cfg.distill.teacher or "")
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def logits_cache_key(teacher_dir: Path, texts: list[str], max_length: int) -> str:
    """The teacher's weights, the texts and max_length (not the batch size: logits do not depend on it)."""
    digest = hashlib.sha256()
    weights = teacher_dir / "model.safetensors"
    digest.update((sha256_file(weights) if weights.exists() else str(teacher_dir)).encode())
    digest.update(f"|{max_length}|{len(texts)}|".encode())
    digest.update("\x00".join(texts).encode())
    return digest.hexdigest()[:24]


def precompute_teacher_logits(run: PreparedRun, batch_size: int = 64) -> pa.Table:
    """The teacher's logits for every training row (in row order), by Ray Data batch inference.

    Cached as parquet under `<storage>/.teacher-logits/`, keyed by `logits_cache_key`: a
    resumed run or a Tune trial reuses them.
    """
    cfg = run.cfg
    teacher_dir = resolve_teacher_dir(cfg.distill.teacher or "")
    texts = run.splits.train.column("text").to_pylist()
    cache = None
    if not is_uri(run.storage):
        key = logits_cache_key(teacher_dir, texts, cfg.data.max_length)
        cache = Path(run.storage) / LOGITS_CACHE_DIR / f"{key}.parquet"
        if cache.exists():
            table = pq.read_table(cache)
            if table.num_rows == run.splits.train.num_rows:
                log.info("teacher logits: %d rows from cache %s", table.num_rows, cache)
                return table.select(["teacher_logits"])
    started = time.time()
    table = infer_teacher_logits(teacher_dir, texts, cfg, batch_size)
    log.info("teacher logits: %d rows by %d Ray Data actors in %.1fs", table.num_rows,
             max(1, cfg.train.num_workers), time.time() - started)
    if cache is not None:
        write_parquet_atomic(table, cache)
    return table


def infer_teacher_logits(teacher_dir: Path, texts: list[str], cfg: Config, batch_size: int) -> pa.Table:
    """One `teacher_logits` row per text, in the texts' order: the batch-inference pipeline
    (`distilray predict`'s tokenise tasks and model actors), one actor per training worker."""
    import dataclasses

    spec = ModelSpec(str(teacher_dir), max_length=cfg.data.max_length,
                     torch_threads=max(1, int(cfg.train.cpus_per_worker)))
    actors = max(1, cfg.train.num_workers)
    gpus = cfg.train.gpus_per_worker if cfg.train.use_gpu else 0.0
    pcfg = dataclasses.replace(cfg.predict, batch_size=batch_size, min_actors=1, max_actors=actors,
                               cpus_per_actor=cfg.train.cpus_per_worker, gpus_per_actor=gpus)
    rows = inference_columns(0, texts, pa.array([None] * len(texts), pa.string()))
    logits: list[list[float]] = []
    order: list[int] = []
    for batch in ordered_results(infer(ray.data.from_arrow(blocks(rows)), spec, pcfg)):
        logits += batch.column("logits").to_pylist()
        order += batch.column(ROW_COLUMN).to_pylist()
    check_order(order, len(texts), "teacher inference")
    return pa.table({"teacher_logits": pa.array(logits, pa.list_(pa.float32()))})
