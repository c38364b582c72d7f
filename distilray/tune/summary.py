"""An experiment read back from its files: one TrialSummary per trial, in the report's order.

Reads only files (no Ray): the experiment's config.yaml, Tune's per-trial params.json and
result.json, events.jsonl and best.json. The tables (`report`) and the figures (`plots`)
both draw from an ExperimentSummary, so it sits below them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilray.config import load_config
from distilray.errors import ConfigError
from distilray.files import read_jsonl
from distilray.tune.experiment import BEST_FILE, CONFIG_FILE, EVENTS_FILE, RUNS_DIR
from distilray.tune.space import max_epochs


@dataclass
class TrialSummary:
    """What the report shows of one trial."""

    trial_id: str
    params: dict[str, Any]
    status: str
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(epoch, metric) of every evaluation, in order."""
    best_value: float | None = None
    best_epoch: float | None = None
    epochs_run: float = 0.0
    time_s: float = 0.0
    dir: str = ""
    restarts: int = 0
    """Times the trial's Train run resumed from a checkpoint after a failure (a dead worker,
    node or trial driver): `restored` events in runs/<trial>/metrics.jsonl."""

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


@dataclass
class ExperimentSummary:
    """What the report shows of a search: its settings and every trial."""

    name: str
    dir: Path
    metric: str
    mode: str
    scheduler: str
    space: dict[str, Any]
    max_epochs: float
    trials: list[TrialSummary]
    best: dict[str, Any] | None


def _trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p.parent for p in exp_dir.glob("*/params.json"))


def _trial_id(trial_dir: Path, rows: list[dict[str, Any]]) -> str:
    for row in rows:
        if row.get("trial_id"):
            return str(row["trial_id"])
    parts = trial_dir.name.split("_")
    for i in range(len(parts) - 1):  # run_trial_<5 hex>_<5 digits>_...
        if len(parts[i]) == 5 and parts[i + 1].isdigit() and len(parts[i + 1]) == 5:
            return f"{parts[i]}_{parts[i + 1]}"
    return trial_dir.name


def summarise_trial(trial_dir: Path, metric: str, mode: str,
                    last_event: dict[str, Any] | None) -> TrialSummary:
    """One trial from its params.json and result.json (which a resumed trial appends to)."""
    params = json.loads((trial_dir / "params.json").read_text())
    rows = [r for r in read_jsonl(trial_dir / "result.json") if metric in r]
    by_step: dict[Any, dict[str, Any]] = {}
    time_s, segment, last_total = 0.0, 0.0, None
    for row in rows:
        by_step[row.get("step", len(by_step))] = row
        t = float(row.get("time_total_s") or 0.0)
        if last_total is not None and t < last_total:  # the trial restarted: a new timer
            time_s += segment
        segment = last_total = t
    time_s += segment
    ordered = sorted(by_step.values(), key=lambda r: (r.get("epoch", 0), r.get("step", 0)))
    curve = [(float(r.get("epoch", i + 1)), float(r[metric])) for i, r in enumerate(ordered)]
    summary = TrialSummary(_trial_id(trial_dir, rows), params, "unfinished", curve, time_s=time_s,
                           dir=str(trial_dir))
    if curve:
        pick = (max if mode == "max" else min)(curve, key=lambda c: c[1])
        summary.best_epoch, summary.best_value = pick
        summary.epochs_run = curve[-1][0]
    last = ordered[-1] if ordered else {}
    # Finished wins over error.txt: Tune writes it on every failure, also one it then retried.
    if last.get("total_steps") is not None and last.get("step", -1) >= last["total_steps"]:
        summary.status = "done"
    elif (trial_dir / "error.txt").exists():
        summary.status = "error"
    elif last_event is not None and last_event.get("state", "").startswith("stopped early"):
        summary.status = "stopped early"
    return summary


def load_experiment_summary(exp_dir: str | Path) -> ExperimentSummary:
    """Every trial of an experiment directory, whatever state the search left it in."""
    exp_dir = Path(exp_dir).expanduser().resolve()
    if not (exp_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{exp_dir} is not a distilray tune experiment (no {CONFIG_FILE}); pass the "
                          "directory `distilray tune` printed, e.g. ~/distilray_results/<name>")
    cfg = load_config(exp_dir / CONFIG_FILE)
    tc = cfg.tune
    last_events: dict[str, dict[str, Any]] = {}
    for event in read_jsonl(exp_dir / EVENTS_FILE):
        last_events[event.get("trial_id", "")] = event
    trials = []
    for trial_dir in _trial_dirs(exp_dir):
        rows = read_jsonl(trial_dir / "result.json")
        tid = _trial_id(trial_dir, rows)
        trial = summarise_trial(trial_dir, tc.metric, tc.mode, last_events.get(tid))
        trial.restarts = sum(r.get("event") == "restored"
                             for r in read_jsonl(exp_dir / RUNS_DIR / tid / "metrics.jsonl"))
        trials.append(trial)
    best = json.loads((exp_dir / BEST_FILE).read_text()) if (exp_dir / BEST_FILE).exists() else None
    return ExperimentSummary(name=exp_dir.name, dir=exp_dir, metric=tc.metric, mode=tc.mode,
                             scheduler=tc.scheduler, space=dict(tc.space), max_epochs=max_epochs(cfg),
                             trials=trials, best=best)


def sorted_trials(exp: ExperimentSummary) -> list[TrialSummary]:
    """Best first; trials without a result last."""
    sign = -1.0 if exp.mode == "max" else 1.0
    return sorted(exp.trials, key=lambda t: (t.best_value is None,
                                             sign * t.best_value if t.best_value is not None else 0.0,
                                             t.trial_id))


def fmt_value(value: Any) -> str:
    """A searched value as tables and legends show it (lr 2.00e-05, wd 0.01)."""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.2e}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def short_key(key: str) -> str:
    """A searched key as column headers and axes name it (train.lr → lr)."""
    return {"train.lr": "lr", "train.weight_decay": "wd"}.get(key, key.split(".")[-1])
