"""Ray Data glue: tokenisation on the cluster, ordered per-worker shards, the padding collate.

The driver puts the training rows in slot order (`plan.global_order`); `OrderedShards`
gives each worker of the current worker group its slots (`plan.rank_row_indices`) and
tokenises each part with Ray Data `map_batches`; each worker pads its batches with
`PadCollate` inside `iter_torch_batches`.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import DataConfig

from distilray.data import pad_batch, tokenize_texts
from distilray.model import load_tokenizer, resolve_model
from distilray.train.plan import even_split_indices, rank_row_indices


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
    """Ordered per-worker parts for however many workers this (re)start has, tokenised on the cluster.

    `train` arrives in slot order (`plan.global_order`); each worker gets the slots
    `plan.rank_row_indices` gives its rank, so an elastic restart on fewer (or more) workers
    keeps every optimizer step's rows. Other datasets are cut into contiguous parts (which keep
    their order; streaming_split would not). Ray Train calls `configure` on every worker-group
    start, with that start's world size.
    """

    def __init__(self, model_name: str, cache_dir: str | None, max_length: int,
                 truncation: str = "head", batch_size: int | None = None,
                 slots_per_step: int | None = None) -> None:
        super().__init__(datasets_to_split=[])
        self.tokenize_kwargs = {"model_name": model_name, "cache_dir": cache_dir,
                                "max_length": max_length, "truncation": truncation}
        self.batch_size, self.slots_per_step = batch_size, slots_per_step

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options.preserve_order = True  # the layout is the schedule
            if name == "train" and self.batch_size and self.slots_per_step:
                parts = self.slot_parts(ds, world_size)
            else:
                cuts = even_split_indices(ds.count(), world_size)
                parts = ds.split_at_indices(cuts) if cuts else [ds]
            for rank, part in enumerate(parts):
                tokenized = part.map_batches(tokenize_arrow_batch, batch_format="pyarrow",
                                             batch_size=512, fn_kwargs=self.tokenize_kwargs)
                tokenized.context.enable_progress_bars = False
                tokenized.context.execution_options.preserve_order = True
                out[rank][name] = tokenized.iterator()
        return out

    def slot_parts(self, ds: ray.data.Dataset, world_size: int) -> list[ray.data.Dataset]:
        """One dataset per rank holding its slots in step order (the rows are small: text)."""
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert self.batch_size and self.slots_per_step
        indices = rank_row_indices(table.num_rows, self.batch_size, self.slots_per_step, world_size)
        parts = []
        for index in indices:
            part = ray.data.from_arrow(table.take(pa.array(index)))
            part.context.execution_options.preserve_order = True
            parts.append(part)
        return parts


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
