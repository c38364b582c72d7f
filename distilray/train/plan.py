"""Step arithmetic, the per-worker row layout, optimizer and schedule (pure: no Ray).

`train/run.py` and `train/loop.py` wire these into Ray Train; tests exercise them on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distilray.data import bucket_order

if TYPE_CHECKING:
    import torch

NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass(frozen=True)
class TrainPlan:
    """Step arithmetic every worker agrees on; computed once by the driver."""

    rows_per_epoch: int
    """Training rows used per epoch: a multiple of the global micro-batch (drop_last)."""
    micro_batches_per_epoch: int
    """Micro-batches each worker runs per epoch."""
    steps_per_epoch: int
    """Optimizer steps per epoch (micro-batches / grad_accum_steps)."""
    total_steps: int
    epochs: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def make_plan(num_rows: int, batch_size: int, world_size: int, grad_accum: int, epochs: int,
              max_steps: int | None = None) -> TrainPlan:
    global_step_rows = batch_size * world_size * grad_accum
    steps_per_epoch = num_rows // global_step_rows
    if steps_per_epoch == 0:
        raise ValueError(f"{num_rows} training rows are fewer than one optimizer step needs "
                         f"({batch_size} per worker × {world_size} workers × {grad_accum} accumulation)")
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
        epochs = math.ceil(total / steps_per_epoch)
    return TrainPlan(rows_per_epoch=steps_per_epoch * global_step_rows,
                     micro_batches_per_epoch=steps_per_epoch * grad_accum,
                     steps_per_epoch=steps_per_epoch, total_steps=total, epochs=epochs)


def global_order(table: pa.Table, plan: TrainPlan, num_workers: int, batch_size: int,
                 seed: int, bucket_batches: int = 0) -> pa.Table:
    """All epochs of training rows in slot order, independent of how many workers run them.

    Epoch e uses a permutation seeded by (seed, e), cut into micro-batch *slots* of
    `batch_size` rows; optimizer step k of the epoch owns slots [k·S, (k+1)·S) with
    S = `slots_per_step` = num_workers × grad_accum_steps (the configured global batch). Who
    runs a slot is decided later (`rank_row_indices`), so an elastic run that continues on
    fewer workers trains the same rows in the same steps.
    """
    n = table.num_rows
    global_batch = batch_size * num_workers
    lengths = pc.utf8_length(table.column("text")).to_numpy() if bucket_batches else None
    chunks = []
    for epoch in range(plan.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)[: plan.rows_per_epoch]
        if lengths is not None:
            order = order[bucket_order(lengths[order], global_batch, bucket_batches, seed + epoch)]
        chunks.append(order)
    return table.take(pa.array(np.concatenate(chunks)))


def slots_per_step(num_workers: int, grad_accum: int) -> int:
    """Micro-batches per optimizer step: fixed by the configured workers, whatever runs them."""
    return num_workers * grad_accum


def rank_micro_batches(slots: int, world: int, rank: int) -> int:
    """Micro-batches rank `rank` of `world` runs per optimizer step (slot j goes to j mod world)."""
    return len(range(rank, slots, world))


def rank_row_indices(num_rows: int, batch_size: int, slots: int, world: int) -> list[np.ndarray]:
    """Row indices (into `global_order`) each of `world` ranks trains on, in its step order.

    Slot j of every step goes to rank j mod world, so the ranks together run every slot of a
    step exactly once for any world size; with world = num_workers and grad_accum 1 this is
    "rank r takes the r-th slice of each global batch".
    """
    slot = np.arange(num_rows // batch_size)
    owner = (slot % slots) % world
    rows = np.arange(num_rows // batch_size * batch_size).reshape(-1, batch_size)
    return [rows[owner == rank].reshape(-1) for rank in range(world)]


def arrange_for_workers(table: pa.Table, plan: TrainPlan, world_size: int, batch_size: int,
                        seed: int, bucket_batches: int = 0) -> pa.Table:
    """All epochs of training rows, laid out rank after rank, each rank's rows in step order.

    Global micro-batch g is rows [g·B·W, (g+1)·B·W) of the epoch's permutation and rank r
    takes the r-th slice of B rows. Cutting the result into W equal contiguous parts therefore
    gives each worker exactly its batches, in order, so 2 workers × batch 8 see the same global
    batches as 1 worker × batch 16, and a restarted worker can skip the batches it already
    trained on.
    """
    ordered = global_order(table, plan, world_size, batch_size, seed, bucket_batches)
    parts = rank_row_indices(ordered.num_rows, batch_size, world_size, world_size)
    return ordered.take(pa.array(np.concatenate(parts)))


def even_split_indices(num_rows: int, parts: int) -> list[int]:
    """Cut points for `parts` contiguous pieces whose sizes differ by at most one."""
    sizes = [num_rows // parts + (1 if i < num_rows % parts else 0) for i in range(parts)]
    return list(np.cumsum(sizes)[:-1].tolist())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel for all parameters (on CPU the default is a Python loop over them)."""
    import torch

    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                    warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout seed for one optimizer step, so a resumed run draws the same masks."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)
