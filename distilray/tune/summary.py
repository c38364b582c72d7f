"""An experiment read back from its files: one TrialSummary per trial, in the report's order.

Reads only files (no Ray): the experiment's config.yaml, Tune's per-trial params.json and
result.json, events.jsonl and best.json. The tables (`report`) and the figures (`plots`)
both draw from an ExperimentSummary, so it sits below them.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilray.config import load_config
from distilray.errors import ConfigError
from distilray.files import read_jsonl
from distilray.tune.experiment import (
    BEST_FILE,
    CONFIG_FILE,
    CONFIRM_DIR,
    CONFIRM_KEY,
    EVENTS_FILE,
    RUNS_DIR,
    SEED_KEY,
)
from distilray.tune.space import asha_rungs, max_epochs


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
    steps: list[int] = field(default_factory=list)
    """Training step of each evaluation in `curve` (Optuna's intermediate-value keys)."""
    started: float | None = None
    ended: float | None = None
    """Unix times of the trial's start and its last report or state change (the timeline)."""
    error: list[str] = field(default_factory=list)
    """The first lines of an errored trial's error.txt, then its last line (the exception)."""
    restarts: int = 0
    """Times the trial's Train run resumed from a checkpoint after a failure (a dead worker,
    node or trial driver): `restored` events in runs/<trial>/metrics.jsonl."""

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


@dataclass
class ConfirmedConfig:
    """One of the top configurations rerun with more seeds, and every run's value."""

    rank: int
    source: str
    """The search trial whose configuration this is (its run counts as the first seed)."""
    params: dict[str, Any]
    seeds: list[int]
    values: list[float]
    runs: list[TrialSummary]
    """The extra seed runs (the source trial not included)."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def spread(self) -> float:
        """Sample standard deviation over the seeds (0 with a single value)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


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
    space_types: dict[str, str] = field(default_factory=dict)
    rungs: list[float] = field(default_factory=list)
    """ASHA's rungs in epochs (empty under FIFO)."""
    confirm: list[ConfirmedConfig] = field(default_factory=list)
    confirm_planned: int = 0
    """Seed runs the config asks for (tune.confirm_top_k × tune.confirm_seeds)."""


ERROR_HEAD_LINES = 6


def read_error(path: Path) -> list[str]:
    """An error.txt's first lines (without Tune's "Failure # 1" header) and its last line."""
    try:
        lines = [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []
    if lines and lines[0].startswith("Failure #"):
        lines = lines[1:]
    if len(lines) <= ERROR_HEAD_LINES + 1:
        return lines
    return [*lines[:ERROR_HEAD_LINES], "…", lines[-1]]


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


def _times(rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """When a trial started and last reported: its first event, else its first report's clock."""
    stamps = [float(e["time"]) for e in events if isinstance(e.get("time"), (int, float))]
    reports = [float(r["timestamp"]) for r in rows if isinstance(r.get("timestamp"), (int, float))]
    start = min(stamps, default=None)
    if start is None and reports:
        start = reports[0] - float(rows[0].get("time_total_s") or 0.0)
    end = max([*stamps, *reports], default=None)
    return start, end


def summarise_trial(trial_dir: Path, metric: str, mode: str,
                    last_event: dict[str, Any] | None,
                    events: list[dict[str, Any]] | None = None) -> TrialSummary:
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
                           dir=str(trial_dir), steps=[int(r.get("step", i + 1)) for i, r in enumerate(ordered)])
    summary.started, summary.ended = _times(rows, events or ([last_event] if last_event else []))
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
        summary.error = read_error(trial_dir / "error.txt")
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
    trials = summarise_trials(exp_dir, tc.metric, tc.mode)
    best = json.loads((exp_dir / BEST_FILE).read_text()) if (exp_dir / BEST_FILE).exists() else None
    exp = ExperimentSummary(name=exp_dir.name, dir=exp_dir, metric=tc.metric, mode=tc.mode,
                            scheduler=tc.scheduler, space=dict(tc.space), max_epochs=max_epochs(cfg),
                            trials=trials, best=best,
                            space_types={k: str(v.get("type")) for k, v in tc.space.items()},
                            rungs=asha_rungs(cfg) if tc.scheduler == "asha" else [],
                            confirm_planned=tc.confirm_top_k * tc.confirm_seeds)
    exp.confirm = load_confirmed(exp, exp_dir / CONFIRM_DIR)
    return exp


def summarise_trials(exp_dir: Path, metric: str, mode: str) -> list[TrialSummary]:
    """Every trial directory of one Tune experiment (the search, or its seed confirmation)."""
    events: dict[str, list[dict[str, Any]]] = {}
    for event in read_jsonl(exp_dir / EVENTS_FILE):
        events.setdefault(event.get("trial_id", ""), []).append(event)
    trials = []
    for trial_dir in _trial_dirs(exp_dir):
        rows = read_jsonl(trial_dir / "result.json")
        tid = _trial_id(trial_dir, rows)
        mine = events.get(tid, [])
        trial = summarise_trial(trial_dir, metric, mode, mine[-1] if mine else None, mine)
        trial.restarts = sum(r.get("event") == "restored"
                             for r in read_jsonl(exp_dir / RUNS_DIR / tid / "metrics.jsonl"))
        trials.append(trial)
    return trials


def load_confirmed(exp: ExperimentSummary, confirm_dir: Path) -> list[ConfirmedConfig]:
    """The seed confirmation's runs grouped by configuration, with the source trial as first seed."""
    if not confirm_dir.is_dir():
        return []
    by_id = {t.trial_id: t for t in exp.trials}
    groups: dict[str, ConfirmedConfig] = {}
    for run in summarise_trials(confirm_dir, exp.metric, exp.mode):
        spec = run.params.get(CONFIRM_KEY) or {}
        source = str(spec.get("source", ""))
        group = groups.get(source)
        if group is None:
            first = by_id.get(source)
            params = {k: v for k, v in (spec.get("params") or {}).items() if k != SEED_KEY}
            group = groups[source] = ConfirmedConfig(
                rank=int(spec.get("rank", len(groups) + 1)), source=source, params=params,
                seeds=[int(spec.get("base_seed", 0))] if first and first.best_value is not None else [],
                values=[first.best_value] if first and first.best_value is not None else [], runs=[])
        run.params = dict(spec.get("params") or {})
        group.runs.append(run)
        if run.best_value is not None and run.status == "done":
            group.seeds.append(int(run.params.get(SEED_KEY, 0)))
            group.values.append(run.best_value)
    return sorted(groups.values(), key=lambda g: g.rank)


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


def plan_confirmation(trials: list[TrialSummary], metric_mode: str, top_k: int, seeds: int,
                      base_seed: int) -> list[dict[str, Any]]:
    """The seed runs after a search: its top_k finished trials × `seeds` new train.seed values.

    Only finished trials are ranked (a stopped trial's value is from a rung, not its end); the
    search's own run keeps base_seed, so the extra runs take base_seed + 1 … + seeds.
    """
    finished = [t for t in trials if t.status == "done" and t.best_value is not None]
    sign = -1.0 if metric_mode == "max" else 1.0
    top = sorted(finished, key=lambda t: (sign * (t.best_value or 0.0), t.trial_id))[:top_k]
    return [{"rank": rank, "source": t.trial_id, "base_seed": base_seed,
             "params": {**t.params, SEED_KEY: base_seed + j}}
            for rank, t in enumerate(top, start=1) for j in range(1, seeds + 1)]
