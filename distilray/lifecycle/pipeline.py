"""`distilray pipeline`: train or tune → optional distill → evaluate → promote, as one command
that can run again.

Every run gets a name no earlier run has (`<pipeline.name>-<UTC time>-<random>`), so a
re-applied RayJob or a scheduled rerun starts fresh runs instead of tripping over finished
ones. The gate decides at the end: a refused model is left in its run directory, the store
and whatever serves it stay as they were. Each run writes `pipeline.json` beside its runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distilray.config import Config
from distilray.errors import ConfigError, PromotionRefused
from distilray.files import is_uri, write_json_atomic
from distilray.lifecycle.gate import Gate
from distilray.lifecycle.promote import Promotion, promote
from distilray.store import STORE_ENV, check_name

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"


def unique_run_name(stem: str, now: float | None = None) -> str:
    """`stem-YYYYmmdd-HHMMSS-xxxxxxxx`: sortable by time; 32 random bits keep two runs in one second apart."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"{stem}-{stamp}-{secrets.token_hex(4)}"


def pipeline_store(cfg: Config) -> str:
    store = cfg.pipeline.store or os.environ.get(STORE_ENV)
    if not store:
        raise ConfigError(f"pipeline.store is not set: name a model store (a directory or "
                          f"s3:// / gs:// URI) or set ${STORE_ENV}")
    return store


def check_pipeline(cfg: Config) -> tuple[str, str]:
    """(store, model name), or ConfigError naming every problem, before any run starts."""
    p = cfg.pipeline
    problems = []
    try:
        store = pipeline_store(cfg)
    except ConfigError as exc:
        problems += exc.problems
        store = ""
    model = p.model or p.name
    try:
        check_name(model)
        check_name(p.name)
    except ConfigError as exc:
        problems += exc.problems
    if p.distill and cfg.distill.teacher:
        problems.append("pipeline.distill distils the model the pipeline trains; leave "
                        "distill.teacher unset (or set pipeline.distill=false to distil from it)")
    if problems:
        raise ConfigError(problems)
    return store, model


def run_pipeline(cfg: Config, run_name: str | None = None) -> dict[str, Any]:
    """Run every stage; returns the record written to pipeline.json (PromotionRefused, with
    the record written, when the gate refuses)."""
    store, model = check_pipeline(cfg)
    name = run_name or unique_run_name(cfg.pipeline.name)
    record: dict[str, Any] = {"name": name, "store": store, "model": model, "stages": [],
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    checkpoint = _train_or_search(cfg, name, record)
    if cfg.pipeline.distill:
        checkpoint = _distill(cfg, name, checkpoint, record)
    p = cfg.pipeline
    gate = Gate(minimum=dict(p.minimum), maximum=dict(p.maximum), tolerance=p.tolerance,
                compare=(p.metric,))
    started = time.monotonic()
    try:
        promoted = promote(cfg, Promotion(checkpoint, store, model, alias=p.alias,
                                          eval_data=p.eval_data, eval_split=p.eval_split, gate=gate))
    except PromotionRefused as exc:
        record["stages"].append({"stage": "promote", "refused": exc.failures,
                                 "checkpoint": checkpoint, "seconds": _since(started)})
        record["result"] = "refused"
        _write_record(cfg, name, record)
        raise
    record["stages"].append({"stage": "promote", **promoted, "seconds": _since(started)})
    record["result"] = "promoted"
    record["promoted"] = promoted
    _write_record(cfg, name, record)
    return record


def _train_or_search(cfg: Config, name: str, record: dict[str, Any]) -> str:
    started = time.monotonic()
    if cfg.pipeline.search:
        from distilray.tune.search import run_tune

        summary = run_tune(replace(cfg, tune=replace(cfg.tune, name=name)))
        checkpoint = str(Path(summary["experiment"]) / "best")
        record["stages"].append({"stage": "tune", "experiment": summary["experiment"],
                                 "trials": summary["trials"], "best": summary["best"]["metrics"],
                                 "seconds": _since(started)})
        return checkpoint
    from distilray.distill.objective import objective_for
    from distilray.train.run import run_training

    train_cfg = replace(cfg, train=replace(cfg.train, name=name))
    summary = run_training(train_cfg, objective_for(train_cfg))
    if not summary.get("best_checkpoint"):
        raise ConfigError(f"run {name} kept no checkpoint with {cfg.train.checkpoint_score_attribute}")
    record["stages"].append({"stage": "train", "run_dir": summary["run_dir"],
                             "best_checkpoint": summary["best_checkpoint"],
                             "best": summary["best_metrics"], "seconds": _since(started)})
    return str(summary["best_checkpoint"])


def _distill(cfg: Config, name: str, teacher: str, record: dict[str, Any]) -> str:
    from distilray.distill.objective import run_distillation

    started = time.monotonic()
    student_cfg = replace(cfg, distill=replace(cfg.distill, teacher=teacher),
                          train=replace(cfg.train, name=f"{name}-student"))
    summary = run_distillation(student_cfg)
    record["stages"].append({"stage": "distill", "teacher": teacher, "run_dir": summary["run_dir"],
                             "best_checkpoint": summary["best_checkpoint"],
                             "best": summary["best_metrics"], "seconds": _since(started)})
    return str(summary["best_checkpoint"])


def _write_record(cfg: Config, name: str, record: dict[str, Any]) -> None:
    root = cfg.tune.storage_path if cfg.pipeline.search else cfg.train.storage_path
    if is_uri(root):
        log.info("pipeline record not written: %s is not a local directory", root)
        return
    record["file"] = str(Path(root).expanduser() / name / PIPELINE_FILE)
    write_json_atomic(record["file"], record)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 1)
