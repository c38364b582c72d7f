"""Ray Data glue: tokenisation on the cluster, ordered per-worker shards, the padding collate.

The driver lays the training rows out so that contiguous equal parts are each worker's
batches in step order (`plan.arrange_for_workers`); `OrderedShards` cuts them that way and
tokenises each part with Ray Data `map_batches`; each worker pads its batches with
`PadCollate` inside `iter_torch_batches`.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from distilray.data import pad_batch, tokenize_texts
from distilray.model import load_tokenizer, resolve_model
from distilray.train.plan import even_split_indices


@lru_cache(maxsize=4)
def cached_tokenizer(model_name: str, cache_dir: str | None):
    """One tokenizer per process and model (Ray Data reuses its worker processes)."""
    return load_tokenizer(resolve_model(model_name, cache_dir))


def tokenize_arrow_batch(batch: pa.Table, model_name: str, cache_dir: str | None,
                         max_length: int, truncation: str = "head") -> pa.Table:
    """Ray Data `map_batches` function: text → unpadded token ids; other columns pass through."""
    tokenizer = cached_tokenizer(model_name, cache_dir)
    ids = tokenize_texts(tokenizer, batch.column("text").to_pylist(), max_length, truncation)
    out = batch.drop_columns(["text"])
    return out.append_column("input_ids", pa.array(ids, pa.list_(pa.int32())))


class OrderedShards(DataConfig):
    """Contiguous, ordered per-worker parts, tokenised on the cluster.

    Contiguous splits keep `arrange_for_workers`' order (streaming_split would not).
    """

    def __init__(self, model_name: str, cache_dir: str | None, max_length: int,
                 truncation: str = "head") -> None:
        super().__init__(datasets_to_split=[])
        self.tokenize_kwargs = {"model_name": model_name, "cache_dir": cache_dir,
                                "max_length": max_length, "truncation": truncation}

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options.preserve_order = True  # the layout is the schedule
            cuts = even_split_indices(ds.count(), world_size)
            parts = ds.split_at_indices(cuts) if cuts else [ds]
            for rank, part in enumerate(parts):
                tokenized = part.map_batches(tokenize_arrow_batch, batch_format="pyarrow",
                                             batch_size=512, fn_kwargs=self.tokenize_kwargs)
                tokenized.context.enable_progress_bars = False
                tokenized.context.execution_options.preserve_order = True
                out[rank][name] = tokenized.iterator()
        return out


class PadCollate(NumpyBatchCollateFn):
    """Ray Data batch (ragged `input_ids`, `label`, extra float columns) → padded torch tensors."""

    def __init__(self, pad_id: int, padding: str, max_length: int, multiple_of: int,
                 float_columns: tuple[str, ...] = ()) -> None:
        self.pad_id, self.padding, self.max_length, self.multiple_of = pad_id, padding, max_length, multiple_of
        self.float_columns = tuple(float_columns)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_batch(list(batch["input_ids"]), self.pad_id, self.padding,
                                    self.max_length, self.multiple_of)
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
               "labels": torch.tensor(np.asarray(batch["label"]), dtype=torch.long)}
        for name in self.float_columns:  # e.g. one list of teacher logits per row
            out[name] = torch.as_tensor(np.stack(list(batch[name])).astype(np.float32))
        return out


class TimedIterator:
    """Wraps the batch iterator to measure how long training waits on Ray Data (input-bound?)."""

    def __init__(self, iterable: Any) -> None:
        self._it = iter(iterable)
        self._waited = 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self._waited += time.perf_counter() - start

    def take_waited(self) -> float:
        """Seconds spent waiting since the last call."""
        waited, self._waited = self._waited, 0.0
        return waited
