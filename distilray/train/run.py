"""The driver of one training run: validate, fit on a Ray Train `TorchTrainer`, summarise.

The driver checks everything it can before touching the cluster (config, model, data,
storage, resources), lays the training rows out in a fixed slot order that any number of
workers can share (`plan.global_order`; an elastic run changes the number), and hands
tokenisation to Ray Data on the cluster (`batches.OrderedShards`). What the objective adds (e.g. a teacher's logits) travels with the
rows; the objective itself travels to the workers in `train_loop_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from distilray import tracking
from distilray.checkpoints import METRICS_FILE, RUN_CONFIG_FILE, write_result
from distilray.config import Config, config_to_dict, dump_config
from distilray.data import Splits, load_splits, tokenize_texts
from distilray.errors import ClusterError, ConfigError, DistilrayError, RunFailed, StorageError
from distilray.files import (
    check_storage_writable,
    is_uri,
    read_jsonl,
    resolve_storage,
    storage_error,
    storage_failure,
    storage_fault,
    write_text_atomic,
)
from distilray.model import load_tokenizer, resolve_model
from distilray.runtime import DATA_CPUS, connect_ray, use_fast_train_polling
from distilray.train.batches import OrderedShards
from distilray.train.loop import forget_storage_fault, train_loop_per_worker
from distilray.train.objective import Objective
from distilray.train.plan import TrainPlan, global_order, make_plan, slots_per_step

log = logging.getLogger(__name__)


def default_run_name() -> str:
    return time.strftime("distilray-%Y%m%d-%H%M%S")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's `metrics.jsonl` records (worker, start, restored, train, eval events)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


@dataclass(frozen=True)
class PreparedRun:
    """Everything checked before the cluster is touched."""

    cfg: Config
    splits: Splits
    plan: TrainPlan
    storage: str

    @property
    def run_dir(self) -> str:
        return f"{self.storage}/{self.cfg.train.name}"


def prepare_run(cfg: Config, objective: Objective) -> PreparedRun:
    """Name the run and validate model, data, storage and step arithmetic (no Ray yet)."""
    name = cfg.train.name or default_run_name()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name))
    cfg = objective.prepare(cfg)
    source = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tokenizer = load_tokenizer(source)
    objective.check(cfg, tokenizer)
    splits = load_splits(cfg.data, cfg.model.num_labels)
    storage = resolve_storage(cfg.train.storage_path)
    check_storage_writable(storage)
    tc = cfg.train
    try:
        plan = make_plan(splits.train.num_rows, tc.batch_size, tc.num_workers, tc.grad_accum_steps,
                         tc.epochs, tc.max_steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.info("data: %s — %d train rows (%d used per epoch), %d eval rows", splits.source,
             splits.train.num_rows, plan.rows_per_epoch, splits.eval.num_rows)
    log.info("model: %s (%s); plan: %d workers × batch %d × accum %d, %d steps/epoch, %d steps",
             cfg.model.name, source.kind, tc.num_workers, tc.batch_size, tc.grad_accum_steps,
             plan.steps_per_epoch, plan.total_steps)
    sample = tokenize_texts(tokenizer, splits.train.column("text").to_pylist()[:2], cfg.data.max_length)
    for ids in sample:
        log.info("sample tokens: %s", " ".join(tokenizer.convert_ids_to_tokens(ids[:24])))
    return PreparedRun(cfg, splits, plan, storage)


def preflight(cfg: Config, storage: str) -> None:
    """Refuse jobs the connected cluster can never run: too many workers, no GPU, no shared storage."""
    tc = cfg.train
    total = ray.cluster_resources()
    if is_elastic(tc):
        check_min_workers_placeable(tc, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")])
    need_cpu = tc.num_workers * tc.cpus_per_worker
    if not is_elastic(tc) and need_cpu + DATA_CPUS > total.get("CPU", 0):
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


def is_elastic(tc: Any) -> bool:
    """`train.min_workers` below `train.num_workers`: the run may shrink and grow."""
    return tc.min_workers is not None and tc.min_workers < tc.num_workers


def placeable_workers(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers of `per_worker` resources fit on these nodes' totals (one never spans nodes)."""
    count = 0
    for resources in nodes:
        count += int(min(resources.get(k, 0.0) // v for k, v in per_worker.items() if v > 0))
    return count


def check_min_workers_placeable(tc: Any, nodes: list[dict[str, float]]) -> None:
    """Refuse a `train.min_workers` the connected cluster can never place (it would wait forever)."""
    per_worker = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}
    fits = placeable_workers(nodes, per_worker)
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    need_cpu = tc.min_workers * tc.cpus_per_worker + DATA_CPUS
    if fits < tc.min_workers or need_cpu > total_cpu:
        raise ConfigError(
            f"train.min_workers={tc.min_workers} can never be placed: the cluster's {len(nodes)} "
            f"node(s) have {total_cpu:g} CPUs and room for {fits} worker(s) of "
            f"{', '.join(f'{v:g} {k}' for k, v in per_worker.items())} each, and "
            f"{tc.min_workers} × train.cpus_per_worker={tc.cpus_per_worker:g} + {DATA_CPUS} for "
            f"Ray Data needs {need_cpu:g} CPUs; lower train.min_workers or add nodes")


def scaling_config(tc: Any) -> ray.train.ScalingConfig:
    """Fixed `num_workers`, or (min_workers, num_workers) for an elastic run."""
    elastic = is_elastic(tc)
    return ray.train.ScalingConfig(
        num_workers=(tc.min_workers, tc.num_workers) if elastic else tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker={"CPU": tc.cpus_per_worker,
                              **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})},
        **({"elastic_resize_monitor_interval_s": tc.elastic_resize_interval_s} if elastic else {}))


def run_training(cfg: Config, objective: Objective, dry_run: bool = False,
                 callbacks: list | None = None) -> dict[str, Any]:
    """`distilray train` (and `distill`): validate, then fit on Ray; returns the result.json content."""
    run = prepare_run(cfg, objective)
    if dry_run:
        return {"dry_run": True, "plan": run.plan.to_dict(), "run_name": run.cfg.train.name,
                "num_workers": run.cfg.train.num_workers, "run_dir": run.run_dir}
    connect_ray(min_cpus=run.cfg.train.num_workers * run.cfg.train.cpus_per_worker)
    preflight(run.cfg, run.storage)
    return fit(run, objective, callbacks=callbacks)


def fit(run: PreparedRun, objective: Objective, callbacks: list | None = None,
        parent_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the TorchTrainer; the objective's extra columns (computed once) travel with the rows.

    `parent_run`: a search's `tracking.read_tracking(exp_dir)`, so a trial is its child MLflow run.
    """
    cfg, tc, run_dir = run.cfg, run.cfg.train, run.run_dir
    forget_storage_fault(run_dir)  # a rerun after freeing space resumes from the last checkpoint
    if not is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(run_dir) / RUN_CONFIG_FILE, dump_config(cfg))
    tracker = tracking.start_train_run(cfg, run_dir, run.splits.source, parent_run)
    use_fast_train_polling()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "plan": run.plan.to_dict(),
                           "run_dir": run_dir, "objective": objective,
                           "tracking": tracker.worker_spec()},
        scaling_config=scaling_config(tc),
        run_config=ray.train.RunConfig(
            name=tc.name, storage_path=run.storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.num_to_keep, checkpoint_score_attribute=tc.checkpoint_score_attribute,
                checkpoint_score_order=tc.checkpoint_score_order),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            callbacks=callbacks),
        datasets=build_datasets(run, objective.extra_columns(run)),
        dataset_config=OrderedShards(cfg.model.name, cfg.model.cache_dir, cfg.data.max_length,
                                     cfg.data.truncation, batch_size=tc.batch_size,
                                     slots_per_step=slots_per_step(tc.num_workers, tc.grad_accum_steps)),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except DistilrayError:
        tracking.end_train_run(tracker, run_dir, None)
        raise
    except Exception as exc:  # Ray wraps worker errors; show the cause in one line
        tracking.end_train_run(tracker, run_dir, None)
        storage = storage_failure(exc) or ray_storage_failure(exc, run_dir)
        if storage:
            raise StorageError(f"training run '{tc.name}' failed: {storage}") from exc
        raise RunFailed(f"training run '{tc.name}' failed: {summarise_failure(exc)} "
                        f"(logs and checkpoints: {run_dir})") from exc
    summary = summarise_result(run, result, started)
    if tracker.active:
        summary["mlflow_run_id"] = tracker.run_id
    if not is_uri(run_dir):
        try:
            write_result(run_dir, summary)
        except StorageError as exc:  # trained, but the storage refused the result: same one line
            tracking.end_train_run(tracker, run_dir, None)
            raise StorageError(f"training run '{tc.name}' failed: {exc}") from exc
    tracking.end_train_run(tracker, run_dir, summary)
    return summary


def build_datasets(run: PreparedRun, extra: pa.Table | None) -> dict[str, ray.data.Dataset]:
    """Train rows (+ the objective's columns) in slot order (`OrderedShards` deals them to
    however many workers run), and the eval rows."""
    tc, table = run.cfg.train, run.splits.train
    for name in extra.column_names if extra is not None else ():
        table = table.append_column(name, extra.column(name))
    ordered = global_order(table, run.plan, tc.num_workers, tc.batch_size, tc.seed,
                           run.cfg.data.bucket_batches)
    return {"train": ray.data.from_arrow(ordered), "eval": ray.data.from_arrow(run.splits.eval)}


def summarise_result(run: PreparedRun, result: Any, started: float) -> dict[str, Any]:
    """What `result.json` holds: the best and latest checkpoints and their metrics."""
    tc = run.cfg.train
    best = best_checkpoint(result, tc.checkpoint_score_attribute, tc.checkpoint_score_order)
    return {
        "run_name": tc.name, "run_dir": run.run_dir,
        "best_checkpoint": best[0] if best else None,
        "best_metrics": best[1] if best else None,
        "latest_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final_metrics": result.metrics,
        "total_steps": run.plan.total_steps, "wall_time_s": round(time.time() - started, 1),
    }


def best_checkpoint(result: Any, attribute: str, order: str) -> tuple[str, dict[str, Any]] | None:
    """(path, metrics) of the best kept checkpoint that reported `attribute`, or None."""
    candidates = [(ckpt.path, metrics) for ckpt, metrics in (result.best_checkpoints or [])
                  if attribute in metrics]
    if not candidates:
        return None
    return (max if order == "max" else min)(candidates, key=lambda c: c[1][attribute])


def ray_storage_failure(exc: BaseException, run_dir: str) -> str | None:
    """A refused write by Ray Train itself (its controller writes the checkpoint snapshot into
    the run directory), found in the exception's causes; the line names the path."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop()
        seen.append(e)
        fault = storage_fault(e)
        if fault is not None:
            return str(storage_error(getattr(e, "filename", None) or run_dir, fault))
        todo += [c for c in (getattr(e, "controller_failure", None), e.__cause__, e.__context__,
                             *getattr(e, "worker_failures", {}).values())
                 if isinstance(c, BaseException) and c not in seen]
    return None


def summarise_failure(exc: BaseException) -> str:
    """The line of a (Ray-wrapped) worker error that names the cause."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]
