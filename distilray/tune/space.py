"""A search space and its settings, checked before any Ray work (pure: no Ray, no files).

`tune.space` maps config keys (section.key) to a distribution; `check_tune_config` reports
every problem of the space, the metric, the search algorithm and the scheduler in one
ConfigError, naming the key and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from distilray.config import Config, apply_overrides
from distilray.errors import ConfigError
from distilray.files import is_uri
from distilray.metrics import REPORTED_METRICS

DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "choice": ("values",),
    "grid": ("values",),
}
METRIC_MODES = {"eval_accuracy": "max", "eval_macro_f1": "max", "eval_loss": "min"}
"""Metrics a search can optimise (all reported by every evaluation) and their direction."""
TUNABLE_SECTIONS = ("model", "data", "train", "distill")
SET_PER_TRIAL = ("train.name", "train.storage_path", "train.checkpoint_score_attribute",
                 "train.checkpoint_score_order")
"""Keys each trial sets itself: its run name, its place in the experiment, checkpoint ranking."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key_problem(key: Any, spec: Any, where: str) -> str | None:
    """Why this space entry's key or shape cannot be searched, or None."""
    if str(key) in SET_PER_TRIAL:
        return f"{where}: {key} is set by each trial and cannot be searched"
    if str(key).split(".")[0] not in TUNABLE_SECTIONS or "." not in str(key):
        return (f"{where}: only keys of the sections {', '.join(TUNABLE_SECTIONS)} can be "
                "searched, written section.key (e.g. train.lr)")
    if not isinstance(spec, Mapping):
        return (f"{where} must be a mapping like {{type: loguniform, low: 1.0e-5, "
                f"high: 1.0e-4}}, got {spec!r}")
    if spec.get("type") not in DISTRIBUTIONS:
        return (f"{where}: unknown distribution type {spec.get('type')!r} "
                f"(choose one of: {', '.join(DISTRIBUTIONS)})")
    return None


def _range_problem(kind: str, low: Any, high: Any, where: str) -> str | None:
    if not (_is_number(low) and _is_number(high)):
        return f"{where}: low and high must be numbers, got low={low!r} high={high!r}"
    if low > high:
        return f"{where}: inverted range low={low!r} > high={high!r}; swap them"
    if low == high:
        return (f"{where}: empty range low = high = {low!r}; widen it, or use "
                f"{{type: choice, values: [{low!r}]}} for a constant")
    if kind == "loguniform" and low <= 0:
        return (f"{where}: loguniform needs low > 0, got low={low!r}; "
                "use uniform for ranges that include 0")
    return None


def _entry_problems(cfg: Config, key: Any, spec: Any) -> list[str]:
    """Every problem of one tune.space entry (the first structural one stops the checks)."""
    where = f"tune.space.{key}"
    problem = _key_problem(key, spec, where)
    if problem:
        return [problem]
    kind = spec["type"]
    fields = DISTRIBUTIONS[kind]
    extra = sorted(set(spec) - {"type", *fields})
    missing = [f for f in fields if f not in spec]
    problems = []
    if extra:
        problems.append(f"{where}: unknown field(s) {', '.join(extra)} for type {kind} "
                        f"(allowed: {', '.join(fields)})")
    if missing:
        return [*problems, f"{where}: type {kind} needs {', '.join(missing)}"]
    if kind in ("loguniform", "uniform"):
        problem = _range_problem(kind, spec["low"], spec["high"], where)
        samples = [spec["low"], spec["high"]]
    else:
        samples = spec["values"]
        problem = (None if isinstance(samples, list) and samples else
                   f"{where}: {kind} needs a non-empty list of values, got {samples!r}")
    if problem:
        return [*problems, problem]
    for value in samples:
        try:
            apply_overrides(cfg, {key: value})
        except ConfigError as exc:
            return [*problems, *(f"{where}: {p}" for p in exc.problems)]
    return problems


def space_problems(cfg: Config) -> list[str]:
    """Every problem of tune.space: unknown keys/distributions, empty or inverted ranges, bad values."""
    if not cfg.tune.space:
        return ["tune.space is empty; give at least one key, e.g. "
                "train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}"]
    return [p for key, spec in cfg.tune.space.items() for p in _entry_problems(cfg, key, spec)]


def search_problems(cfg: Config) -> list[str]:
    """Metric, mode, search algorithm and scheduler settings that cannot work together."""
    tc = cfg.tune
    problems = []
    if tc.metric not in METRIC_MODES:
        reported = ", ".join(REPORTED_METRICS)
        problems.append(f"tune.metric={tc.metric!r} is not a metric training reports; choose one of "
                        f"{', '.join(METRIC_MODES)} (every evaluation reports: {reported})")
    elif METRIC_MODES[tc.metric] != tc.mode:
        problems.append(f"tune.mode={tc.mode!r} would select the worst trial by {tc.metric}; "
                        f"set tune.mode={METRIC_MODES[tc.metric]}")
    kinds = {key: spec.get("type") for key, spec in tc.space.items() if isinstance(spec, Mapping)}
    if tc.search_alg == "grid":
        continuous = [k for k, kind in kinds.items() if kind in ("loguniform", "uniform")]
        if continuous:
            problems.append(f"tune.search_alg=grid cannot sample continuous ranges "
                            f"({', '.join(continuous)}); give them as {{type: grid, values: [...]}} "
                            "or use search_alg random/optuna")
    if tc.search_alg == "optuna":
        grids = [k for k, kind in kinds.items() if kind == "grid"]
        if grids:
            problems.append(f"tune.search_alg=optuna does not take grid values ({', '.join(grids)}); "
                            "use type choice, or search_alg grid")
    if tc.scheduler == "pbt":
        problems.append("tune.scheduler=pbt is not supported: PBT restarts trials from another trial's "
                        "Tune checkpoint, while our trials checkpoint through Ray Train; use asha or fifo")
    max_t = max_epochs(cfg)
    if tc.scheduler == "asha" and tc.grace_period > max_t:
        problems.append(f"tune.grace_period={tc.grace_period:g} epochs exceeds the {max_t:g} epochs a "
                        "trial runs (tune.max_t or train.epochs); lower grace_period")
    if is_uri(tc.storage_path):
        problems.append(f"tune.storage_path={tc.storage_path!r}: experiments need a local directory or "
                        "a shared mount (best/ and the report are written there)")
    return problems


def max_epochs(cfg: Config) -> float:
    """ASHA's max_t: tune.max_t, else the most epochs any trial of the space runs."""
    if cfg.tune.max_t is not None:
        return float(cfg.tune.max_t)
    spec = cfg.tune.space.get("train.epochs")
    if isinstance(spec, Mapping) and isinstance(spec.get("values"), list) and spec["values"]:
        return float(max(spec["values"]))
    if isinstance(spec, Mapping) and _is_number(spec.get("high")):
        return float(spec["high"])
    return float(cfg.train.epochs)


def asha_rungs(cfg: Config) -> list[float]:
    """ASHA's milestones in epochs: grace_period × reduction_factor^k, counted as Ray's ASHA does."""
    tc, max_t = cfg.tune, max_epochs(cfg)
    if tc.grace_period > max_t:
        return []
    count = int(math.log(max_t / tc.grace_period) / math.log(tc.reduction_factor) + 1)
    return [tc.grace_period * tc.reduction_factor ** k for k in range(count)]


def confirm_problems(cfg: Config, with_count: bool = True) -> list[str]:
    """tune.confirm_top_k and tune.confirm_seeds work together, and need the seed left unsearched."""
    tc = cfg.tune
    if not (tc.confirm_top_k or tc.confirm_seeds):
        return []
    problems = []
    if not (tc.confirm_top_k and tc.confirm_seeds):
        problems.append(f"tune.confirm_top_k={tc.confirm_top_k} and tune.confirm_seeds={tc.confirm_seeds}: "
                        "set both (e.g. 2 and 2) to rerun the top configurations with more seeds, or neither")
    if "train.seed" in tc.space:
        problems.append("tune.confirm_seeds reruns configurations with other train.seed values, so "
                        "train.seed cannot be searched as well; remove it from tune.space")
    if with_count and tc.confirm_top_k > count_trials(cfg):
        problems.append(f"tune.confirm_top_k={tc.confirm_top_k} exceeds the {count_trials(cfg)} trials "
                        "the search runs; lower it")
    return problems


def check_tune_config(cfg: Config) -> None:
    """Raise one ConfigError listing every problem of the tune section, before any Ray work."""
    problems = space_problems(cfg) + search_problems(cfg)
    problems += confirm_problems(cfg, with_count=not problems)
    if problems:
        raise ConfigError(problems)


def count_trials(cfg: Config) -> int:
    """Trials the search will run: the grid's size × num_samples (Tune's semantics)."""
    grid = 1
    for spec in cfg.tune.space.values():
        if spec.get("type") == "grid" or (cfg.tune.search_alg == "grid" and spec.get("type") == "choice"):
            grid *= len(spec["values"])
    return grid * cfg.tune.num_samples


def space_extremes(cfg: Config, key: str) -> list[Any]:
    """The values of a searched key that matter for sizing (all choices, or low and high)."""
    spec = cfg.tune.space.get(key)
    if spec is None:
        return []
    return list(spec["values"]) if "values" in spec else [spec["low"], spec["high"]]

