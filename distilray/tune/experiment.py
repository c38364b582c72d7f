"""An experiment directory on disk: its layout, the trial configs, and the best checkpoint's export.

Files only (no Ray), so `distilray report` and the tests read an experiment without a cluster.
Layout (`<tune.storage_path>/<tune.name>/`):

    config.yaml     the resolved run config (what `--resume` and `distilray report` read)
    events.jsonl    one line per trial state change (running / stopped early / done / error)
    <trial dirs>/   Tune's per-trial params.json, result.json (every report)
    runs/<trial>/   the trial's Ray Train run: checkpoint-step*/ in Hugging Face format
    best/ best.json the best trial's best checkpoint and what it is
    confirm/        with tune.confirm_top_k: the top configurations rerun with more seeds, the
                    same layout again (trial dirs, events.jsonl, runs/)
    report.html report.md trials.csv   see `distilray.tune.report`
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distilray.checkpoints import NOT_SERVED
from distilray.config import Config, apply_overrides, load_config
from distilray.errors import ConfigError
from distilray.files import is_uri, replace_dir_atomic, resolve_storage, write_json_atomic

CONFIG_FILE = "config.yaml"
EVENTS_FILE = "events.jsonl"
BEST_DIR = "best"
BEST_FILE = "best.json"
RUNS_DIR = "runs"
CONFIRM_DIR = "confirm"
"""The seed confirmation: a second Tune experiment inside the first, laid out the same way."""
CONFIRM_KEY = "confirm"
"""A confirmation trial's one Tune parameter: {rank, source, base_seed, params (with train.seed)}."""
SEED_KEY = "train.seed"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A search's name, directory and the config every trial starts from."""

    name: str
    dir: Path
    cfg: Config


def load_experiment(name: str, storage_path: str) -> Experiment:
    """The experiment `--resume NAME` or a report names, with the config it was started with."""
    exp_dir = Path(resolve_storage(storage_path)) / name
    if not (exp_dir / CONFIG_FILE).exists():
        raise ConfigError(f"no experiment {name!r} under {resolve_storage(storage_path)} (no {CONFIG_FILE}); "
                          "pass --storage-path where it lives")
    return Experiment(name, exp_dir, load_config(exp_dir / CONFIG_FILE))


def absolutize_paths(cfg: Config, base: Path | None = None) -> Config:
    """Trials run with the trial directory as cwd, so local paths must not be relative."""
    base = base or Path.cwd()

    def fix(value: str | None) -> str | None:
        if not value or is_uri(value) or value.startswith(("offline:", "synthetic:")) or value == "tiny":
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        return str((base / path).resolve()) if (base / path).exists() else value

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=fix(cfg.model.name), cache_dir=fix(cfg.model.cache_dir)),
        data=dataclasses.replace(cfg.data, dataset=fix(cfg.data.dataset)),
        distill=dataclasses.replace(cfg.distill, teacher=fix(cfg.distill.teacher)),
        tune=dataclasses.replace(cfg.tune, storage_path=resolve_storage(cfg.tune.storage_path)))


def trial_config(base: Config, params: Mapping[str, Any], exp_dir: str, trial_id: str) -> Config:
    """A trial's full config: the base, the sampled values, and its place in the experiment."""
    return apply_overrides(base, {
        **params,
        "train.name": trial_id,
        "train.storage_path": f"{exp_dir}/{RUNS_DIR}",
        # Ray Train keeps the best checkpoints by the metric the search ranks trials by.
        "train.checkpoint_score_attribute": base.tune.metric,
        "train.checkpoint_score_order": base.tune.mode,
    })


def is_better(value: float, than: float | None, mode: str) -> bool:
    return than is None or (value > than if mode == "max" else value < than)


def find_checkpoints(exp_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint on disk under runs/, with the metrics it was saved with."""
    found = []
    for meta in sorted((exp_dir / RUNS_DIR).glob("*/checkpoint-step*/distilray.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or torn by a crash
        if not (meta.parent / "config.json").exists():
            continue
        found.append({"trial_id": meta.parent.parent.name, "path": str(meta.parent),
                      "step": info.get("step"), "metrics": info.get("metrics", {})})
    return found


def select_best(checkpoints: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best checkpoint by metric; ties go to the earlier step (less training, same score)."""
    best = None
    for ckpt in checkpoints:
        value = ckpt["metrics"].get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or is_better(value, best["metrics"][metric], mode):
            best = ckpt
    return best


def trial_params(exp_dir: Path, trial_id: str) -> dict[str, Any]:
    """The sampled values of a trial, from Tune's params.json."""
    for params in exp_dir.glob(f"*{trial_id}*/params.json"):
        try:
            return json.loads(params.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def export_best(exp_dir: Path, metric: str, mode: str) -> dict[str, Any] | None:
    """Copy the best checkpoint to best/ (HF format, no optimizer state) atomically, and write best.json."""
    best = select_best(find_checkpoints(exp_dir), metric, mode)
    if best is None:
        return None
    info = {"trial_id": best["trial_id"], "checkpoint": best["path"], "step": best["step"],
            "metric": metric, "mode": mode, "params": trial_params(exp_dir, best["trial_id"]),
            "metrics": best["metrics"]}
    run_config = Path(best["path"]).parent / CONFIG_FILE
    if run_config.exists():
        import yaml

        info["config"] = yaml.safe_load(run_config.read_text())
    def build(tmp: Path) -> None:
        shutil.copytree(best["path"], tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*NOT_SERVED))
        write_json_atomic(tmp / BEST_FILE, info)

    replace_dir_atomic(build, exp_dir / BEST_DIR)
    write_json_atomic(exp_dir / BEST_FILE, info)
    return info
