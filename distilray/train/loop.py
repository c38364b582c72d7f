"""The loop every Ray Train worker runs, for fine-tuning and distillation alike.

`train_loop_per_worker` reads like nanoGPT's loop: set up the worker, restore from
`ray.train.get_checkpoint()` when the run restarts (after a worker died, or when the driver is
rerun with the same name), then for each batch an autocast forward, `objective.loss` and a
backward; on a sync micro-step `optimizer_step`, the progress window, and
`evaluate_and_report` when an evaluation is due. What differs between recipes sits behind the
`Objective` (`train/objective.py`), which arrives inside `train_loop_config`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from distilray import checkpoints, tracking
from distilray.checkpoints import METRICS_FILE, TRAINING_STATE, checkpoint_name
from distilray.config import Config, config_from_dict
from distilray.errors import StorageError
from distilray.files import is_uri, storage_error, storage_fault
from distilray.metrics import confusion_counts, metrics_from_confusion
from distilray.runtime import quiet_ray_data
from distilray.train.batches import PadCollate, TimedIterator, cached_tokenizer
from distilray.train.objective import Objective
from distilray.train.plan import (
    TrainPlan,
    build_optimizer,
    build_scheduler,
    rank_micro_batches,
    slots_per_step,
    step_seed,
)

log = logging.getLogger(__name__)


class RunLog:
    """Append-only JSON lines in the run directory (local path or URI); rank 0 writes most."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._records: list[dict[str, Any]] = []
        self.sink: tracking.StepLogger | None = None
        """Rank 0: the train / eval records also go to MLflow and TensorBoard (`distilray.tracking`)."""

    def write(self, record: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink(record)
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        if is_uri(self.run_dir):
            import pyarrow.fs as pafs

            self._records.append(record)
            fs, root = pafs.FileSystem.from_uri(self.run_dir)
            with fs.open_output_stream(f"{root}/{METRICS_FILE}") as out:
                out.write("".join(json.dumps(r) + "\n" for r in self._records).encode())
            return
        path = Path(self.run_dir) / METRICS_FILE
        try:
            with open(path, "a") as fh:
                fh.write(line)
        except OSError as exc:
            raise storage_fault_error(self.run_dir, str(path), exc, "training log") from exc


@dataclass
class Worker:
    """Everything one worker holds while it trains (built by `setup_worker`)."""

    cfg: Config
    plan: TrainPlan
    objective: Objective
    rank: int
    world: int
    device: torch.device
    runlog: RunLog
    tokenizer: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    use_amp: bool
    amp_dtype: torch.dtype
    train_collate: PadCollate
    eval_collate: PadCollate
    eval_shard: Any


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, train, evaluate, checkpoint, report."""
    w = setup_worker(loop_config)
    cfg, tc, plan, objective = w.cfg, w.cfg.train, w.plan, w.objective
    step = restore(w)
    model = ray.train.torch.prepare_model(w.model)  # DDP when world > 1; w.model stays the module
    w.model = model.module if hasattr(model, "module") else model
    model.train()
    if step >= plan.total_steps:
        if w.rank == 0:
            log.info("run already finished at step %d", step)
        return
    batches = TimedIterator(ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=tc.batch_size, collate_fn=w.train_collate, prefetch_batches=2))
    progress = ProgressWindow(w, batches)
    # The global batch is fixed by the configured workers: S slots per step, this rank runs
    # `accum` of them (more when an elastic run continues on fewer workers), and each slot's
    # loss is scaled by world/S so DDP's mean over ranks is the mean over all S slots.
    slots = slots_per_step(tc.num_workers, tc.grad_accum_steps)
    accum = rank_micro_batches(slots, w.world, w.rank)
    scale, skip, micro = w.world / slots, step * accum, 0
    want_hidden = objective.needs_hidden_states(cfg)
    torch.manual_seed(step_seed(tc.seed, w.rank, step))
    for index, batch in enumerate(batches):
        if index < skip:  # a restored worker skips the batches it already trained on
            continue
        batch = {k: v.to(w.device) for k, v in batch.items()}
        sync = (micro + 1) % accum == 0
        no_sync = not sync and hasattr(model, "no_sync")  # DDP syncs on the last micro-step only
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(device_type=w.device.type, dtype=w.amp_dtype, enabled=w.use_amp):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=want_hidden)
                loss = objective.loss(cfg, out, batch)
            (w.scaler.scale(loss * scale) if w.scaler else loss * scale).backward()
        micro += 1
        progress.add(loss.item(), batch["labels"].shape[0])
        if not sync:
            continue
        optimizer_step(w, model)
        step += 1
        torch.manual_seed(step_seed(tc.seed, w.rank, step))
        end_of_epoch, done = step % plan.steps_per_epoch == 0, step >= plan.total_steps
        if step % tc.log_every_steps == 0 or end_of_epoch or done:
            progress.log(step)
        if end_of_epoch or done or (tc.eval_every_steps and step % tc.eval_every_steps == 0):
            evaluate_and_report(w, step, progress.epoch_loss())
            if end_of_epoch:
                progress.new_epoch()
        if done:
            break


def setup_worker(loop_config: dict[str, Any]) -> Worker:
    """Config, model, optimizer, schedule, precision and collates of this worker."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_ray_data()
    cfg = config_from_dict(loop_config["config"])
    objective: Objective = loop_config["objective"]
    tc, data = cfg.train, cfg.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runlog = RunLog(loop_config["run_dir"])
    runlog.sink = tracking.worker_sink(cfg, runlog.run_dir, loop_config.get("tracking"), rank)
    if not is_uri(runlog.run_dir):
        record_worker(runlog, rank)
    torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker)))
    device = ray.train.torch.get_device()

    tokenizer = cached_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = objective.build_model(cfg)
    objective.setup_worker(cfg, device)
    if device.type == "cpu" and tc.cpu_kernels:
        from distilray.cpu_kernels import use_cpu_training_kernels

        changed = use_cpu_training_kernels(model)
        if rank == 0 and changed:
            log.info("CPU training kernels: %s (train.cpu_kernels=false turns them off)", ", ".join(changed))
    plan = TrainPlan(**loop_config["plan"])
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.scheduler, plan.total_steps, tc.warmup_ratio)
    use_amp = cpu_autocast_ok(tc.mixed_precision, rank) if device.type == "cpu" else tc.mixed_precision != "no"
    scaler = torch.amp.GradScaler("cuda") if use_amp and tc.mixed_precision == "fp16" else None
    pad = (tokenizer.pad_token_id, data.padding, data.max_length, data.pad_to_multiple_of)
    return Worker(cfg=cfg, plan=plan, objective=objective, rank=rank, world=world, device=device,
                  runlog=runlog, tokenizer=tokenizer, model=model, optimizer=optimizer,
                  scheduler=scheduler, scaler=scaler, use_amp=use_amp,
                  amp_dtype=torch.bfloat16 if tc.mixed_precision == "bf16" else torch.float16,
                  train_collate=PadCollate(*pad, float_columns=objective.batch_columns(cfg)),
                  eval_collate=PadCollate(*pad), eval_shard=ray.train.get_dataset_shard("eval"))


def record_worker(runlog: RunLog, rank: int) -> None:
    """Where this worker runs; `distilray tune` frees its placement group if the run is killed."""
    group = ray.util.get_current_placement_group()
    runlog.write({"event": "worker", "rank": rank, "pid": os.getpid(),
                  "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                  "node_id": ray.get_runtime_context().get_node_id(),
                  "placement_group": group.id.hex() if group else None})


def restore(w: Worker) -> int:
    """Load the latest checkpoint Ray Train hands this worker; returns the step to continue from."""
    checkpoint = ray.train.get_checkpoint()
    if w.rank == 0:
        raise_recorded_storage_fault(w.runlog.run_dir)
    if checkpoint is None:
        if w.rank == 0:
            w.runlog.write({"event": "start", "step": 0, "total_steps": w.plan.total_steps,
                            "workers": w.world, "plan": w.plan.to_dict()})
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        from safetensors.torch import load_file

        w.model.load_state_dict(load_file(str(Path(ckpt_dir) / "model.safetensors")), strict=False)
        state = torch.load(Path(ckpt_dir) / TRAINING_STATE, map_location="cpu", weights_only=False)
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        if w.scaler is not None and state.get("scaler"):
            w.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
    if w.rank == 0:
        epoch = step // w.plan.steps_per_epoch
        log.info("restored from checkpoint at step %d (epoch %d)", step, epoch)
        w.runlog.write({"event": "restored", "step": step, "epoch": epoch, "workers": w.world})
        if w.world != w.cfg.train.num_workers:
            log.info("continuing on %d of train.num_workers=%d workers; the global batch stays "
                     "%d rows (each worker accumulates more micro-batches)", w.world,
                     w.cfg.train.num_workers,
                     w.cfg.train.batch_size * w.cfg.train.num_workers * w.cfg.train.grad_accum_steps)
    return step


def optimizer_step(w: Worker, model: torch.nn.Module) -> None:
    """Unscale, clip, step, advance the schedule, clear the gradients."""
    if w.scaler:
        w.scaler.unscale_(w.optimizer)
    if w.cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.cfg.train.max_grad_norm)
    if w.scaler:
        w.scaler.step(w.optimizer)
        w.scaler.update()
    else:
        w.optimizer.step()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)


def evaluate_and_report(w: Worker, step: int, train_loss: float | None) -> None:
    """Count the eval shard on every worker, sum the counts, checkpoint and report from rank 0."""
    eval_batches = w.eval_shard.iter_torch_batches(batch_size=w.cfg.train.batch_size * 2,
                                                   collate_fn=w.eval_collate)
    cm, loss_sum = eval_counts(w.model, eval_batches, w.cfg.model.num_labels, w.device)
    reduced = all_reduce_sum([*cm.ravel().tolist(), loss_sum], w.device)
    cm = np.asarray(reduced[:-1], dtype=np.int64).reshape(cm.shape)
    metrics = metrics_from_confusion(cm)
    metrics["eval_loss"] = reduced[-1] / max(1, metrics["eval_count"])
    metrics.update({"step": step, "epoch": step / w.plan.steps_per_epoch,
                    "lr": w.scheduler.get_last_lr()[0]})
    if train_loss is not None:
        metrics["train_loss"] = train_loss
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    w.runlog.write({"event": "eval", **metrics})
    log.info("eval step %d epoch %.2f: accuracy %.4f macro-F1 %.4f loss %.4f (%d examples)",
             step, metrics["epoch"], metrics["eval_accuracy"], metrics["eval_macro_f1"],
             metrics["eval_loss"], metrics["eval_count"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_checkpoint(w, Path(tmp), step, metrics)
        except OSError as exc:
            raise storage_fault_error(w.runlog.run_dir, tmp, exc, "checkpoint (local staging)") from exc
        dest = f"{w.runlog.run_dir}/{checkpoint_name(step)}"
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(step))
        except OSError as exc:
            if storage_fault(exc) is None:
                raise
            if not is_uri(dest):  # the half-copied directory: nobody registered it, free its space
                shutil.rmtree(dest, ignore_errors=True)
            raise storage_fault_error(w.runlog.run_dir, dest, exc, "checkpoint") from exc


STORAGE_FAULT_NAMESPACE = "distilray_storage_faults"


def storage_fault_error(run_dir: str, path: str, exc: OSError, what: str) -> Exception:
    """The one-line error for a refused write, remembered in the GCS for this run directory so
    the restarts Ray Train makes fail at once instead of training to the next checkpoint again
    (the driver forgets it when a run starts: a rerun after freeing space resumes)."""
    fault = storage_fault(exc)
    if fault is None:
        return exc
    error = storage_error(path, fault, what)
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_put(run_dir, str(error), overwrite=True,
                                     namespace=STORAGE_FAULT_NAMESPACE)
    return error


def raise_recorded_storage_fault(run_dir: str) -> None:
    """A restart of a run whose storage refused a write fails at once with the same line."""
    from ray.experimental import internal_kv

    try:
        recorded = internal_kv._internal_kv_get(run_dir, namespace=STORAGE_FAULT_NAMESPACE)
    except Exception:  # no GCS client in this process: nothing recorded
        return
    if recorded:
        raise StorageError(recorded.decode())


def forget_storage_fault(run_dir: str) -> None:
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_del(run_dir, namespace=STORAGE_FAULT_NAMESPACE)


def save_checkpoint(w: Worker, directory: Path, step: int, metrics: dict[str, Any]) -> None:
    """Hugging Face format (+ training state) so `pipeline(model=dir)` loads it directly."""
    cfg, epoch = w.cfg, int(step // w.plan.steps_per_epoch)
    meta = {"run_name": cfg.train.name, "step": step, "epoch": epoch, "metrics": metrics,
            "model_name": cfg.model.name, "max_length": cfg.data.max_length,
            "truncation": cfg.data.truncation, "label_names": cfg.model.label_names, **w.objective.checkpoint_meta(cfg)}
    state = {"optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict(),
             "scaler": w.scaler.state_dict() if w.scaler is not None else None,
             "step": step, "epoch": epoch}
    checkpoints.save_checkpoint(directory, w.model, w.tokenizer, state, meta)


def eval_counts(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], num_labels: int,
                device: torch.device) -> tuple[np.ndarray, float]:
    """(confusion counts, summed loss) over batches; sums add up across workers."""
    model.eval()
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    loss_sum = 0.0
    with torch.inference_mode():
        for batch in batches:
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            cm += confusion_counts(logits.argmax(-1).cpu().numpy(), labels.cpu().numpy(), num_labels)
    model.train()
    return cm, loss_sum


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-worker values across the group (as float64); a single worker returns them as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class ProgressWindow:
    """Loss, samples/s, data wait and ETA since the last log line (rank 0 logs; all ranks sum)."""

    def __init__(self, w: Worker, batches: TimedIterator) -> None:
        self.w, self.batches = w, batches
        self.loss, self.n, self.rows, self.start = 0.0, 0, 0, time.time()
        self.epoch_sum, self.epoch_n = 0.0, 0

    def add(self, loss: float, rows: int) -> None:
        self.loss, self.n, self.rows = self.loss + loss, self.n + 1, self.rows + rows

    def epoch_loss(self) -> float | None:
        """Mean training loss of the epoch so far (over the logged windows)."""
        return self.epoch_sum / max(1, self.epoch_n) if self.epoch_n else None

    def new_epoch(self) -> None:
        self.epoch_sum, self.epoch_n = 0.0, 0

    def log(self, step: int) -> None:
        w, tc = self.w, self.w.cfg.train
        loss_sum, n, rows = all_reduce_sum([self.loss, self.n, self.rows], w.device)
        elapsed = time.time() - self.start
        mean_loss = loss_sum / max(1, n)
        self.epoch_sum, self.epoch_n = self.epoch_sum + loss_sum, self.epoch_n + n
        if w.rank == 0:
            rate = rows / elapsed if elapsed > 0 else 0.0
            global_batch = tc.batch_size * tc.num_workers * tc.grad_accum_steps
            eta = (w.plan.total_steps - step) * global_batch / rate if rate else 0
            data_wait = self.batches.take_waited() / elapsed if elapsed > 0 else 0.0
            epoch, lr = step / w.plan.steps_per_epoch, w.scheduler.get_last_lr()[0]
            w.runlog.write({"event": "train", "step": step, "epoch": epoch, "loss": mean_loss,
                            "lr": lr, "samples_per_s": rate, "data_wait": data_wait})
            log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.1f samples/s (%.0f%% waiting for "
                     "data) ETA %s", step, w.plan.total_steps, epoch, mean_loss, lr, rate,
                     100 * data_wait, format_eta(eta))
        self.loss, self.n, self.rows, self.start = 0.0, 0, 0, time.time()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def cpu_autocast_ok(mixed_precision: str, rank: int = 0) -> bool:
    """bf16 autocast runs on CPU too (oneDNN bf16 kernels); fp16 autocast is for GPUs only."""
    if mixed_precision == "fp16":
        if rank == 0:
            log.warning("train.mixed_precision=fp16 needs a GPU; training on CPU in fp32 "
                        "(bf16 autocasts on CPU too)")
        return False
    if mixed_precision == "bf16" and rank == 0 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("train.mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), "
                    "so bf16 will be slower than fp32 here")
    return mixed_precision == "bf16"
