"""The promotion gate: a version takes an alias only if its evaluation clears every bar and is
not worse than the version holding the alias, on the same eval set, by more than a tolerance.

Pure: it compares two `eval.json` reports (`distilray evaluate`), so it is tested without a
model, a store or Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from distilray.errors import ConfigError

LOWER_IS_BETTER = ("loss", "ece")
"""Metric names containing these are better when smaller (eval_loss, eval_ece)."""


@dataclass(frozen=True)
class Gate:
    minimum: Mapping[str, float] = field(default_factory=dict)
    """Bars a metric must reach (`--min eval_accuracy=0.85`)."""
    maximum: Mapping[str, float] = field(default_factory=dict)
    """Bars a metric must stay under (`--max eval_ece=0.05`)."""
    tolerance: float = 0.0
    """How much worse than the current holder of the alias the candidate may be."""
    compare: tuple[str, ...] = ("eval_accuracy",)
    """Metrics compared with the current holder (plus every metric with a bar)."""

    def compared_metrics(self) -> list[str]:
        return list(dict.fromkeys([*self.compare, *self.minimum, *self.maximum]))


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def parse_bars(items: Iterable[str], flag: str = "--min") -> dict[str, float]:
    """`["eval_accuracy=0.85", ...]` → {metric: value}; every malformed item is named."""
    bars, problems = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            bars[key.strip()] = float(value)
        except ValueError:
            problems.append(f"{flag} {item!r}: expected METRIC=NUMBER, e.g. {flag} eval_accuracy=0.85")
    if problems:
        raise ConfigError(problems)
    return bars


def check_metrics_known(gate: Gate, report: Mapping[str, Any]) -> None:
    """Every gated metric must be one the evaluation reports (a typo must not pass silently)."""
    known = sorted(k for k, v in report.items() if isinstance(v, int | float) and k.startswith("eval_"))
    unknown = [m for m in gate.compared_metrics() if m not in known]
    if unknown:
        raise ConfigError(f"the gate names {', '.join(unknown)}, which the evaluation does not "
                          f"report; use one of {', '.join(known)}")


def same_eval_set(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two reports scored the same rows (the data fingerprint `distilray evaluate` records)."""
    sha = (a.get("data") or {}).get("sha256")
    return bool(sha) and sha == (b.get("data") or {}).get("sha256")


def gate_failures(gate: Gate, candidate: Mapping[str, Any], current: Mapping[str, Any] | None,
                  current_name: str = "production") -> list[str]:
    """Every bar the candidate fails, each with both numbers; [] when it may be promoted."""
    check_metrics_known(gate, candidate)
    failures = []
    for metric, bar in gate.minimum.items():
        if candidate[metric] < bar:
            failures.append(f"{metric} {candidate[metric]:.4f} is below the bar {bar:.4f}")
    for metric, bar in gate.maximum.items():
        if candidate[metric] > bar:
            failures.append(f"{metric} {candidate[metric]:.4f} is above the bar {bar:.4f}")
    if current is None:
        return failures
    if not same_eval_set(candidate, current):
        raise ConfigError("the candidate and the current version were evaluated on different "
                          "rows; evaluate both on one eval set")
    for metric in gate.compared_metrics():
        ours, theirs = float(candidate[metric]), float(current[metric])
        worse_by = ours - theirs if lower_is_better(metric) else theirs - ours
        if worse_by > gate.tolerance + 1e-12:
            failures.append(f"{metric} {ours:.4f} is worse than {current_name}'s {theirs:.4f} "
                            f"by {worse_by:.4f} (tolerance {gate.tolerance:.4f})")
    return failures
