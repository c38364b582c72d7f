"""`distilray train`: data-parallel fine-tuning with Ray Train (V2 API), fed by Ray Data.

The driver validates everything it can before touching the cluster (config, model, data,
storage, resources), lays out the training rows so each worker gets its own batches in a
fixed order (see `engine.arrange_for_workers`), and hands tokenisation to Ray Data
`map_batches` on the cluster. Each worker restores from `ray.train.get_checkpoint()` when
the run restarts — after a worker dies, or when the driver is rerun with the same name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from distilray import checkpoints
from distilray.checkpoints import METRICS_FILE, TRAINING_STATE, checkpoint_name, write_result
from distilray.config import Config, config_from_dict, config_to_dict, dump_config
from distilray.data import Splits, load_splits, tokenize_texts
from distilray.engine import (
    TrainPlan,
    arrange_for_workers,
    build_optimizer,
    build_scheduler,
    eval_counts,
    even_split_indices,
    make_plan,
    step_seed,
)
from distilray.errors import ClusterError, ConfigError, DistilrayError, RunFailed
from distilray.files import read_jsonl
from distilray.metrics import metrics_from_confusion
from distilray.model import load_tokenizer, resolve_model
from distilray.runtime import (
    DATA_CPUS,
    check_storage_writable,
    connect_ray,
    is_uri,
    quiet_ray_data,
    resolve_storage,
)

log = logging.getLogger(__name__)

REPORTED_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_count", "step", "epoch", "lr",
                    "train_loss")
"""Keys of every `ray.train.report` of `train_loop_per_worker` (what Tune can rank and schedule on)."""


def default_run_name() -> str:
    return time.strftime("distilray-%Y%m%d-%H%M%S")


class RunLog:
    """Append-only JSON lines in the run directory (local path or URI)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        if is_uri(self.run_dir):
            import pyarrow.fs as pafs

            self._records.append(record)
            fs, root = pafs.FileSystem.from_uri(self.run_dir)
            with fs.open_output_stream(f"{root}/{METRICS_FILE}") as out:
                out.write("".join(json.dumps(r) + "\n" for r in self._records).encode())
            return
        with open(Path(self.run_dir) / METRICS_FILE, "a") as fh:
            fh.write(line)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


# --------------------------------------------------------------------------- Ray Data glue


@lru_cache(maxsize=4)
def _cached_tokenizer(model_name: str, cache_dir: str | None):
    return load_tokenizer(resolve_model(model_name, cache_dir))


def tokenize_arrow_batch(batch: pa.Table, model_name: str, cache_dir: str | None,
                         max_length: int) -> pa.Table:
    """Ray Data `map_batches` function: text → unpadded token ids; other columns pass through."""
    tokenizer = _cached_tokenizer(model_name, cache_dir)
    ids = tokenize_texts(tokenizer, batch.column("text").to_pylist(), max_length)
    out = batch.drop_columns(["text"])
    return out.append_column("input_ids", pa.array(ids, pa.list_(pa.int32())))


def make_data_config(model_name: str, cache_dir: str | None, max_length: int):
    """A Ray Train DataConfig that cuts datasets into contiguous, ordered per-worker parts."""
    from ray.train import DataConfig

    class OrderedShards(DataConfig):
        """Contiguous splits keep `arrange_for_workers`' order (streaming_split would not)."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options.preserve_order = True  # the layout is the schedule
                cuts = even_split_indices(ds.count(), world_size)
                parts = ds.split_at_indices(cuts) if cuts else [ds]
                for rank, part in enumerate(parts):
                    tokenized = part.map_batches(
                        tokenize_arrow_batch, batch_format="pyarrow", batch_size=512,
                        fn_kwargs={"model_name": model_name, "cache_dir": cache_dir,
                                   "max_length": max_length})
                    tokenized.context.enable_progress_bars = False
                    tokenized.context.execution_options.preserve_order = True
                    out[rank][name] = tokenized.iterator()
            return out

    return OrderedShards(datasets_to_split=[])


def make_collate(pad_id: int, padding: str, max_length: int, multiple_of: int):
    """`engine.PadCollate` as the collate class Ray Data's iter_torch_batches expects."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    from distilray.engine import PadCollate

    class RayPadCollate(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self.pad = PadCollate(pad_id, padding, max_length, multiple_of)

        def __call__(self, batch):
            return self.pad(batch)

    return RayPadCollate()


# --------------------------------------------------------------------------- the worker loop


def build_model(cfg: Config):
    """The model a worker trains: the configured classifier, or a distillation student."""
    from distilray.model import load_classifier, set_dropout

    if cfg.distill.teacher:
        from distilray.distill import build_student

        return build_student(cfg)
    model = load_classifier(resolve_model(cfg.model.name, cfg.model.cache_dir), cfg.model.label_names,
                            seed=cfg.train.seed)
    if cfg.model.dropout is not None:
        set_dropout(model, cfg.model.dropout)
    return model


def save_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, scaler, step: int,
                    epoch: int, metrics: dict[str, Any], cfg: Config) -> None:
    """Hugging Face format (+ training state) so `pipeline(model=dir)` loads it directly."""
    meta = {"run_name": cfg.train.name, "step": step, "epoch": epoch, "metrics": metrics,
            "model_name": cfg.model.name, "max_length": cfg.data.max_length,
            "label_names": cfg.model.label_names}
    if cfg.distill.teacher:  # a student: model.name is only the teacher whose vocabulary it reads
        d = cfg.distill
        meta["model_name"] = d.student
        meta["distill"] = {"teacher": d.teacher, "student": d.student, "temperature": d.temperature,
                           "alpha": d.alpha, "cosine_weight": d.cosine_weight}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "step": step, "epoch": epoch}
    checkpoints.save_checkpoint(directory, model, tokenizer, state, meta)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, train, evaluate, checkpoint, report."""
    import tempfile

    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_ray_data()
    cfg = config_from_dict(loop_config["config"])
    plan = TrainPlan(**loop_config["plan"])
    run_dir: str = loop_config["run_dir"]
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runlog = RunLog(run_dir)
    if not is_uri(run_dir):
        import socket

        group = ray.util.get_current_placement_group()  # `distilray tune` frees it if the run is killed
        runlog.write({"event": "worker", "rank": rank, "pid": os.getpid(),
                      "node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                      "node_id": ray.get_runtime_context().get_node_id(),
                      "placement_group": group.id.hex() if group else None})
    torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker)))
    device = ray.train.torch.get_device()

    tokenizer = _cached_tokenizer(cfg.model.name, cfg.model.cache_dir)
    model = build_model(cfg)
    teacher = None
    if cfg.distill.teacher and cfg.distill.teacher_logits == "on_the_fly":
        from distilray.distill import load_teacher

        teacher = load_teacher(cfg).to(device)
    if device.type == "cpu" and tc.cpu_kernels:
        from distilray.cpu_kernels import use_cpu_training_kernels

        changed = use_cpu_training_kernels(model)
        if rank == 0 and changed:
            log.info("CPU training kernels: %s (train.cpu_kernels=false turns them off)", ", ".join(changed))
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.scheduler, plan.total_steps, tc.warmup_ratio)
    use_amp = cpu_autocast_ok(tc.mixed_precision, rank) if device.type == "cpu" else tc.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if tc.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and tc.mixed_precision == "fp16" else None

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(Path(ckpt_dir) / "model.safetensors")), strict=False)
            state = torch.load(Path(ckpt_dir) / TRAINING_STATE, map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
        if rank == 0:
            log.info("restored from checkpoint at step %d (epoch %d)", step, step // plan.steps_per_epoch)
            runlog.write({"event": "restored", "step": step, "epoch": step // plan.steps_per_epoch})
    elif rank == 0:
        runlog.write({"event": "start", "step": 0, "total_steps": plan.total_steps,
                      "workers": world, "plan": plan.to_dict()})

    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    model.train()

    collate = make_collate(tokenizer.pad_token_id, cfg.data.padding, cfg.data.max_length,
                         cfg.data.pad_to_multiple_of)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    accum = tc.grad_accum_steps
    batches = TimedIterator(train_shard.iter_torch_batches(batch_size=tc.batch_size, collate_fn=collate,
                                                           prefetch_batches=2))
    skip = step * accum

    def evaluate_and_report(train_loss: float | None) -> None:
        cm, loss_sum = eval_counts(raw_model, eval_shard.iter_torch_batches(
            batch_size=tc.batch_size * 2, collate_fn=collate), cfg.model.num_labels, device)
        reduced = _all_reduce_sum([*cm.ravel().tolist(), loss_sum], device)
        cm = np.asarray(reduced[:-1], dtype=np.int64).reshape(cm.shape)
        metrics = metrics_from_confusion(cm)
        metrics["eval_loss"] = reduced[-1] / max(1, metrics["eval_count"])
        metrics.update({"step": step, "epoch": step / plan.steps_per_epoch,
                        "lr": scheduler.get_last_lr()[0]})
        if train_loss is not None:
            metrics["train_loss"] = train_loss
        if rank == 0:
            runlog.write({"event": "eval", **metrics})
            log.info("eval step %d epoch %.2f: accuracy %.4f macro-F1 %.4f loss %.4f (%d examples)",
                     step, metrics["epoch"], metrics["eval_accuracy"], metrics["eval_macro_f1"],
                     metrics["eval_loss"], metrics["eval_count"])
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), raw_model, tokenizer, optimizer, scheduler, scaler,
                                step, int(step // plan.steps_per_epoch), metrics, cfg)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint_name(step))
        else:
            ray.train.report(metrics, checkpoint=None)

    if step >= plan.total_steps:
        if rank == 0:
            log.info("run already finished at step %d", step)
        return

    window_loss, window_n, micro = 0.0, 0, 0
    window_start, window_rows = time.time(), 0
    epoch_loss, epoch_n = 0.0, 0
    want_hidden = bool(cfg.distill.teacher) and cfg.distill.cosine_weight > 0
    torch.manual_seed(step_seed(tc.seed, rank, step))
    for index, batch in enumerate(batches):
        if index < skip:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = (micro + 1) % accum == 0
        context = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with context:
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=want_hidden)
                loss = compute_loss(cfg, out.logits.float(), batch, teacher,
                                    out.hidden_states[-1] if want_hidden else None)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        micro += 1
        window_loss += loss.item()
        window_n += 1
        window_rows += batch["labels"].shape[0]
        if not sync:
            continue
        if scaler:
            scaler.unscale_(optimizer)
        if tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        torch.manual_seed(step_seed(tc.seed, rank, step))
        end_of_epoch = step % plan.steps_per_epoch == 0
        done = step >= plan.total_steps
        if step % tc.log_every_steps == 0 or end_of_epoch or done:
            loss_sum, n, rows = _all_reduce_sum([window_loss, window_n, window_rows], device)
            elapsed = time.time() - window_start
            mean_loss = loss_sum / max(1, n)
            epoch_loss, epoch_n = epoch_loss + loss_sum, epoch_n + n
            if rank == 0:
                rate = rows / elapsed if elapsed > 0 else 0.0
                eta = (plan.total_steps - step) * (tc.batch_size * world * accum) / rate if rate else 0
                data_wait = batches.take_waited() / elapsed if elapsed > 0 else 0.0
                runlog.write({"event": "train", "step": step, "epoch": step / plan.steps_per_epoch,
                              "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                              "samples_per_s": rate, "data_wait": data_wait})
                log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.1f samples/s (%.0f%% waiting for "
                         "data) ETA %s", step, plan.total_steps, step / plan.steps_per_epoch, mean_loss,
                         scheduler.get_last_lr()[0], rate, 100 * data_wait, _format_eta(eta))
            window_loss, window_n, window_rows, window_start = 0.0, 0, 0, time.time()
        if end_of_epoch or done or (tc.eval_every_steps and step % tc.eval_every_steps == 0):
            evaluate_and_report(epoch_loss / max(1, epoch_n) if epoch_n else None)
            if end_of_epoch:
                epoch_loss, epoch_n = 0.0, 0
        if done:
            break


def cpu_autocast_ok(mixed_precision: str, rank: int = 0) -> bool:
    """bf16 autocast runs on CPU too (oneDNN bf16 kernels); fp16 autocast is for GPUs only."""
    import torch

    if mixed_precision == "fp16":
        if rank == 0:
            log.warning("train.mixed_precision=fp16 needs a GPU; training on CPU in fp32 "
                        "(bf16 autocasts on CPU too)")
        return False
    if mixed_precision == "bf16" and rank == 0 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("train.mixed_precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX), "
                    "so bf16 will be slower than fp32 here")
    return mixed_precision == "bf16"


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


def compute_loss(cfg: Config, logits, batch, teacher, student_hidden=None) -> Any:
    """Cross-entropy, or the distillation loss when a teacher is configured."""
    import torch.nn.functional as F

    if not cfg.distill.teacher:
        return F.cross_entropy(logits, batch["labels"])
    from distilray.distill import distill_step_loss

    return distill_step_loss(cfg, logits, batch, teacher, student_hidden)


# --------------------------------------------------------------------------- driver


def preflight(cfg: Config, storage: str) -> None:
    """Refuse jobs the connected cluster can never run: too many workers, no GPU, no shared storage."""
    import ray

    tc = cfg.train
    total = ray.cluster_resources()
    need_cpu = tc.num_workers * tc.cpus_per_worker
    if need_cpu + DATA_CPUS > total.get("CPU", 0):
        raise ClusterError(
            f"train.num_workers={tc.num_workers} × train.cpus_per_worker={tc.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs (+{DATA_CPUS} for Ray Data tokenisation) but the cluster has "
            f"{total.get('CPU', 0):g}; use fewer workers or a bigger cluster")
    if tc.use_gpu:
        need_gpu = tc.num_workers * tc.gpus_per_worker
        if total.get("GPU", 0) < need_gpu:
            raise ClusterError(
                f"train.use_gpu=true needs {need_gpu:g} GPUs ({tc.num_workers} workers × "
                f"{tc.gpus_per_worker:g}) but the cluster has {total.get('GPU', 0):g}; "
                "drop --gpu or add GPU nodes")
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1 and not is_uri(storage) and not tc.shared_storage:
        raise ClusterError(
            f"train.storage_path={storage!r} is a local directory but the cluster spans "
            f"{len(hosts)} hosts; multi-node training needs shared storage: use an s3:// or gs:// "
            "URI, or an NFS mount and set train.shared_storage=true")


def _summarise_failure(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


@dataclass(frozen=True)
class PreparedRun:
    """Everything checked before the cluster is touched."""

    cfg: Config
    splits: Splits
    plan: TrainPlan
    storage: str


def prepare_run(cfg: Config) -> PreparedRun:
    """Name the run and validate model, data, storage and step arithmetic (no Ray yet)."""
    import dataclasses

    name = cfg.train.name or default_run_name()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name))
    if cfg.distill.teacher:
        from distilray.distill import distill_config

        cfg = distill_config(cfg)  # the student reads the teacher's token ids: model.name = teacher
    source = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tokenizer = load_tokenizer(source)
    if cfg.distill.teacher:
        from distilray.distill import check_distill_config

        check_distill_config(cfg, tokenizer)
    splits = load_splits(cfg.data, cfg.model.num_labels)
    storage = resolve_storage(cfg.train.storage_path)
    check_storage_writable(storage)
    try:
        plan = make_plan(splits.train.num_rows, cfg.train.batch_size, cfg.train.num_workers,
                         cfg.train.grad_accum_steps, cfg.train.epochs, cfg.train.max_steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.info("data: %s — %d train rows (%d used per epoch), %d eval rows", splits.source,
             splits.train.num_rows, plan.rows_per_epoch, splits.eval.num_rows)
    log.info("model: %s (%s); plan: %d workers × batch %d × accum %d, %d steps/epoch, %d steps",
             cfg.model.name, source.kind, cfg.train.num_workers, cfg.train.batch_size,
             cfg.train.grad_accum_steps, plan.steps_per_epoch, plan.total_steps)
    sample = tokenize_texts(tokenizer, splits.train.column("text").to_pylist()[:2], cfg.data.max_length)
    for ids in sample:
        log.info("sample tokens: %s", " ".join(tokenizer.convert_ids_to_tokens(ids[:24])))
    return PreparedRun(cfg, splits, plan, storage)


def run_training(cfg: Config, dry_run: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """`distilray train`: validate, then fit on Ray; returns the result.json content."""
    run = prepare_run(cfg)
    if dry_run:
        return {"dry_run": True, "plan": run.plan.to_dict(), "run_name": run.cfg.train.name,
                "num_workers": run.cfg.train.num_workers,
                "run_dir": f"{run.storage}/{run.cfg.train.name}"}
    connect_ray(min_cpus=run.cfg.train.num_workers * run.cfg.train.cpus_per_worker)
    preflight(run.cfg, run.storage)
    return fit(run, callbacks=callbacks)


def fit(run: PreparedRun, extra_train_columns: pa.Table | None = None,
        callbacks: list | None = None) -> dict[str, Any]:
    """Run the TorchTrainer; extra columns (e.g. teacher logits) travel with the train rows."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg, splits, plan, storage = run.cfg, run.splits, run.plan, run.storage
    tc = cfg.train
    run_dir = f"{storage}/{tc.name}"
    if not is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text(dump_config(cfg))
    train_table = splits.train
    if extra_train_columns is None and cfg.distill.teacher and cfg.distill.teacher_logits == "precomputed":
        from distilray.distill import precompute_teacher_logits

        extra_train_columns = precompute_teacher_logits(run)  # cached: Tune trials share one pass
    if extra_train_columns is not None:
        for col in extra_train_columns.column_names:
            train_table = train_table.append_column(col, extra_train_columns.column(col))
    arranged = arrange_for_workers(train_table, plan, tc.num_workers, tc.batch_size, tc.seed,
                                   cfg.data.bucket_batches)
    datasets = {"train": ray.data.from_arrow(arranged), "eval": ray.data.from_arrow(splits.eval)}
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "plan": plan.to_dict(), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=tc.name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute=tc.checkpoint_score_attribute,
                checkpoint_score_order=tc.checkpoint_score_order),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=make_data_config(cfg.model.name, cfg.model.cache_dir, cfg.data.max_length),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except DistilrayError:
        raise
    except Exception as exc:  # Ray wraps worker errors; show the cause in one line
        raise RunFailed(f"training run '{tc.name}' failed: {_summarise_failure(exc)} "
                             f"(logs and checkpoints: {run_dir})") from exc
    best = _best_checkpoint(result, tc.checkpoint_score_attribute, tc.checkpoint_score_order)
    summary = {
        "run_name": tc.name, "run_dir": run_dir,
        "best_checkpoint": best[0] if best else None,
        "best_metrics": best[1] if best else None,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final_metrics": result.metrics,
        "total_steps": plan.total_steps, "wall_time_s": round(time.time() - started, 1),
    }
    if not is_uri(run_dir):
        write_result(run_dir, summary)
    return summary


def _best_checkpoint(result, attribute: str, order: str) -> tuple[str, dict[str, Any]] | None:
    candidates = [(ckpt.path, metrics) for ckpt, metrics in (result.best_checkpoints or [])
                  if attribute in metrics]
    if not candidates:
        return None
    return (max if order == "max" else min)(candidates, key=lambda c: c[1][attribute])
