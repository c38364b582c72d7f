"""`distilray promote`: evaluate a checkpoint, pass the gate, store it as the next immutable
version, move the alias, and (with `--deploy`) move a running application to it.

Order: evaluate → gate → write the bundle → move the alias → register in MLflow → deploy.
A refused gate stops before anything is written, so nothing served or stored changes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distilray import __version__, tracking
from distilray.checkpoints import RUN_CONFIG_FILE, check_servable, read_meta, resolve_checkpoint_dir
from distilray.config import Config
from distilray.errors import ConfigError, PromotionRefused
from distilray.files import sha256_file
from distilray.lifecycle.gate import Gate, gate_failures, same_eval_set
from distilray.store import EVAL_FILE, LINEAGE_FILE, ModelStore, check_alias, check_name

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json", ".tsv", ".txt")


@dataclass(frozen=True)
class Promotion:
    checkpoint: str
    """A checkpoint, a `distilray train` run directory (its best) or a tune experiment (best/)."""
    store: str
    name: str
    alias: str = "production"
    eval_data: str | None = None
    """Dataset spec to evaluate on (default: the run's own data.dataset)."""
    eval_split: str = "validation"
    gate: Gate = field(default_factory=Gate)


def promote(cfg: Config, req: Promotion) -> dict[str, Any]:
    """Evaluate, gate, store and alias `req.checkpoint`; the summary of what happened.

    Raises PromotionRefused (naming each failed bar and both numbers) and changes nothing
    when the gate refuses.
    """
    from distilray.batch.jobs import evaluate_checkpoint

    check_name(req.name)
    check_alias(req.alias)
    ckpt = check_servable(resolve_checkpoint_dir(req.checkpoint))
    run_config = source_config(ckpt)
    data = req.eval_data or (run_config.get("data") or {}).get("dataset") or cfg.data.dataset
    store = ModelStore(req.store)
    with tempfile.TemporaryDirectory(prefix="distilray-promote-") as tmp:
        report = evaluate_checkpoint(cfg, str(ckpt), data, split=req.eval_split,
                                     output=str(Path(tmp, "candidate")))
        current_version = store.aliases(req.name).get(req.alias)
        current = (current_eval(cfg, store, req, current_version, report, data, Path(tmp))
                   if current_version else None)
        failures = gate_failures(req.gate, report, current, f"{req.alias} ({req.name}@{current_version})")
        if failures:
            raise PromotionRefused(failures)
        documents = {EVAL_FILE: json.loads(Path(tmp, "candidate", "eval.json").read_text()),
                     "eval.md": Path(tmp, "candidate", "eval.md").read_text(),
                     LINEAGE_FILE: lineage(ckpt, run_config, report)}
        from distilray.store import write_bundle

        version = store.find_weights(req.name, report["checkpoint"]["sha256"])
        reused = version is not None
        if version is None:
            version = store.publish(req.name, lambda d: write_bundle(ckpt, d, documents))
    metrics = {m: report[m] for m in req.gate.compared_metrics()}
    previous = store.aliases(req.name).get(req.alias)
    if previous != version:
        store.set_alias(req.name, req.alias, version, "promote",
                        {"metrics": metrics, "eval_data": report["data"]["sha256"],
                         "source": str(ckpt)})
    registered = tracking.register_model_version(
        cfg.track, req.name, store.uri(req.name, version), req.alias,
        tags={"distilray.version": version, "distilray.store": store.root,
              **{f"distilray.{k}": f"{v:.6f}" for k, v in metrics.items()}},
        run_id=tracking.find_run_id(ckpt))
    return {"model": req.name, "version": version, "alias": req.alias, "previous": previous,
            "mlflow_version": registered,
            "reused": reused, "uri": store.uri(req.name, version), "metrics": metrics,
            "current_metrics": ({m: current[m] for m in metrics} if current else None),
            "eval": {"data": report["data"]["spec"], "split": report["data"]["split"],
                     "rows": report["data"]["rows"]}}


def current_eval(cfg: Config, store: ModelStore, req: Promotion, version: str,
                 candidate: dict[str, Any], data: str, tmp: Path) -> dict[str, Any]:
    """The alias holder's evaluation on the candidate's eval set (re-evaluated when its stored
    eval.json scored other rows)."""
    from distilray.batch.jobs import evaluate_checkpoint

    stored = store.read_json(req.name, version, EVAL_FILE) or {}
    if same_eval_set(candidate, stored):
        return stored
    log.info("%s@%s was evaluated on other rows; evaluating it on %s [%s]", req.name, version,
             data, req.eval_split)
    local = store.local_bundle(req.name, version)
    return evaluate_checkpoint(cfg, str(local), data, split=req.eval_split,
                               output=str(tmp / "current"))


def source_config(ckpt: Path) -> dict[str, Any]:
    """The resolved config of the run that wrote `ckpt` ({} when it is not known)."""
    import yaml

    for candidate in (ckpt.parent / RUN_CONFIG_FILE, ckpt / RUN_CONFIG_FILE):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    best = ckpt / "best.json"  # a tune experiment's best/: the trial's config is recorded
    if best.is_file():
        return json.loads(best.read_text()).get("config") or {}
    return {}


def lineage(ckpt: Path, run_config: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Where a version came from: source run, config, data fingerprints, teacher, code."""
    meta = read_meta(ckpt)
    best = ckpt / "best.json"
    trial = json.loads(best.read_text()) if best.is_file() else {}
    return {
        "source": {"checkpoint": str(ckpt), "checkpoint_id": report["checkpoint"]["id"],
                   "run_name": meta.get("run_name"), "step": meta.get("step"),
                   "run_dir": str(ckpt.parent) if (ckpt.parent / RUN_CONFIG_FILE).is_file() else None,
                   "trial_id": trial.get("trial_id"), "trial_params": trial.get("params")},
        "config": run_config,
        "data": {"train": data_identity(run_config.get("data") or {}),
                 "eval": report["data"]},
        "teacher": (meta.get("distill") or {}).get("teacher"),
        "distill": meta.get("distill"),
        "model_name": meta.get("model_name"),
        "max_length": meta.get("max_length"),
        "mlflow_run_id": tracking.find_run_id(ckpt),
        "distilray": __version__,
        "git_commit": git_commit(),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def data_identity(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The training data spec, and the sha256 of its files when it is a local path."""
    spec = data_cfg.get("dataset")
    out: dict[str, Any] = {k: data_cfg.get(k) for k in
                           ("dataset", "train_split", "max_train_samples", "seed") if k in data_cfg}
    path = Path(str(spec)).expanduser() if spec else None
    if path is not None and path.exists():
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
        out["files"] = {str(f.relative_to(path) if path.is_dir() else f.name): sha256_file(f)
                        for f in files}
    return out


def git_commit() -> str | None:
    """HEAD of the git checkout the command runs in (where the configs live), if any."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def rollback(store_root: str, name: str, alias: str = "production", to: str | None = None) -> dict[str, Any]:
    """Point `alias` back at `to`, or at the version it held before its last move."""
    store = ModelStore(store_root)
    check_alias(alias)
    current = store.aliases(name).get(alias)
    if current is None:
        raise ConfigError(f"{store_root}/{name} has no alias {alias!r} to roll back")
    target = store.resolve(name, to) if to else previous_holder(store.history(name), alias, current)
    if target is None:
        raise ConfigError(f"{store_root}/{name}@{alias} has no earlier version to roll back to; "
                          "name one with --to vN")
    if target == current:
        raise ConfigError(f"{store_root}/{name}@{alias} already points at {current}")
    store.local_bundle(name, target)  # never point an alias at a bundle that fails verification
    store.set_alias(name, alias, target, "rollback")
    return {"model": name, "alias": alias, "version": target, "previous": current,
            "uri": store.uri(name, target)}


def previous_holder(history: list[dict[str, Any]], alias: str, current: str) -> str | None:
    """The version `alias` pointed at before it last moved to `current`."""
    for record in reversed(history):
        if record.get("alias") == alias and record.get("version") == current:
            return record.get("previous")
    return None


def with_model(cfg: Config, model: str) -> Config:
    return replace(cfg, serve=replace(cfg.serve, model=model, checkpoint=None))
