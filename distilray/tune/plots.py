"""The report's figures: SVG drawn here from an ExperimentSummary, with no plotting dependency.

`make_plots` returns each figure as SVG text; `report` embeds them in the HTML as data: URIs
and writes them to plots/ for the Markdown report, so the HTML opens offline with nothing to
fetch.
"""

from __future__ import annotations

import html
import math

from distilray.tune.summary import (
    ExperimentSummary,
    TrialSummary,
    fmt_value,
    short_key,
    sorted_trials,
)

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]


class Scale:
    """Data → pixel mapping for one axis, linear or log10, with readable ticks."""

    def __init__(self, values: list[float], lo_px: float, hi_px: float, log: bool = False,
                 pad: float = 0.06, floor: float | None = None, ceil: float | None = None):
        self.log = log
        vals = [math.log10(v) for v in values if v > 0] if log else list(values)
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - (0.5 if log else max(abs(lo) * 0.1, 0.05)), hi + (0.5 if log else max(abs(hi) * 0.1, 0.05))
        span = hi - lo
        lo, hi = lo - pad * span, hi + pad * span
        if floor is not None:
            lo = max(lo, floor)
        if ceil is not None:
            hi = min(hi, ceil)
        self.lo, self.hi, self.lo_px, self.hi_px = lo, hi, lo_px, hi_px
        self.nonneg = not log and bool(vals) and min(vals) >= 0  # no negative ticks for lr, wd, accuracy

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.lo_px + (v - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            out = []
            for e in range(math.floor(self.lo), math.ceil(self.hi) + 1):
                mults = (1, 2, 5) if self.hi - self.lo < 2.5 else (1,)
                for m in mults:
                    v = m * 10.0 ** e
                    if self.lo <= math.log10(v) <= self.hi:
                        out.append((v, f"{m}e{e}" if m != 1 else f"1e{e}"))
            return out
        raw = (self.hi - self.lo) / 5
        mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
        step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
        start = math.ceil(self.lo / step) * step
        out, v = [], start
        while v <= self.hi + 1e-12:
            if not (self.nonneg and v < -1e-12):
                v = 0.0 if abs(v) < 1e-12 else v
                out.append((v, f"{v:.10g}" if abs(v) >= 1e-4 or v == 0 else f"{v:.1e}"))
            v += step
        return out


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
            f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
            f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
            f'{html.escape(title)}</text>']


def _axes(parts: list[str], x: Scale, y: Scale, box: tuple[float, float, float, float],
          xlabel: str, ylabel: str) -> None:
    left, top, right, bottom = box
    parts.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
                 'fill="#fafafa" stroke="#888"/>')
    for v, label in x.ticks():
        px = x(v)
        parts.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{px:.1f}" y="{bottom + 15}" text-anchor="middle">{label}</text>')
    for v, label in y.ticks():
        py = y(v)
        parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e3e3e3"/>')
        parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text x="{(left + right) / 2}" y="{bottom + 34}" text-anchor="middle">'
                 f'{html.escape(xlabel)}</text>')
    parts.append(f'<text x="14" y="{(top + bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + bottom) / 2})">{html.escape(ylabel)}</text>')


def _color_scale(value: float, lo: float, hi: float, higher_is_better: bool) -> str:
    """Red (worst) → yellow → green (best)."""
    t = 0.5 if hi - lo < 1e-12 else (value - lo) / (hi - lo)
    t = t if higher_is_better else 1 - t
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            rgb = [round(a + (b - a) * f) for a, b in zip(c0, c1, strict=True)]
            return "#" + "".join(f"{c:02x}" for c in rgb)
    return "#1a9850"


def _marker(t: TrialSummary, px: float, py: float, color: str, r: float = 5.0) -> str:
    if t.status == "stopped early":
        return (f'<path d="M{px - r:.1f},{py - r:.1f} L{px + r:.1f},{py + r:.1f} M{px - r:.1f},{py + r:.1f} '
                f'L{px + r:.1f},{py - r:.1f}" stroke="{color}" stroke-width="2.5"/>')
    if t.status == "error":
        return f'<rect x="{px - r:.1f}" y="{py - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{color}"/>'
    return f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{r}" fill="{color}" stroke="#333"/>'


def _is_log_key(exp: ExperimentSummary, key: str) -> bool:
    """Learning rates and anything sampled log-uniformly or spanning 10× and more go on a log axis."""
    spec = exp.space.get(key, {})
    if spec.get("type") == "loguniform" or key.endswith(".lr"):
        return True
    vals = [v for v in spec.get("values", []) if isinstance(v, (int, float))]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= 10


def plot_space(exp: ExperimentSummary, xkey: str, ykey: str | None) -> str:
    """Best metric of every trial over two searched keys (lr × wd), colour = metric."""
    w, h = 560, 430
    box = (70, 40, 440, 350)
    trials = [t for t in exp.trials if t.best_value is not None and xkey in t.params]
    parts = _svg_open(w, h, f"best {exp.metric} over {short_key(xkey)}"
                      + (f" × {short_key(ykey)}" if ykey else ""))
    xs = [float(t.params[xkey]) for t in trials]
    ys = [float(t.params[ykey]) for t in trials] if ykey else [t.best_value for t in trials]
    x = Scale(xs, box[0], box[2], log=_is_log_key(exp, xkey), pad=0.1)
    y = Scale(ys, box[3], box[1], log=bool(ykey) and _is_log_key(exp, ykey), pad=0.12)
    _axes(parts, x, y, box, short_key(xkey) + (" (log)" if x.log else ""),
          short_key(ykey) if ykey else exp.metric)
    values = [t.best_value for t in trials]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    best_id = (exp.best or {}).get("trial_id")
    labels: list[tuple[float, float]] = []
    sign = -1.0 if exp.mode == "max" else 1.0  # best first: its value label wins where points crowd
    for t, xv, yv in sorted(zip(trials, xs, ys, strict=True), key=lambda p: sign * p[0].best_value):
        px, py = x(xv), y(yv)
        color = _color_scale(t.best_value, lo, hi, exp.mode == "max")
        if t.trial_id == best_id:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="11" fill="none" stroke="#000" '
                         'stroke-width="2"/>')
        parts.append(_marker(t, px, py, color, 7))
        if all(abs(px - lx) > 34 or abs(py - ly) > 12 for lx, ly in labels):  # no overlapping labels
            labels.append((px, py))
            parts.append(f'<text x="{px + 10:.1f}" y="{py - 8:.1f}" font-size="10">{t.best_value:.3f}</text>')
    # colour bar
    for i in range(50):
        v = lo + (hi - lo) * i / 49
        parts.append(f'<rect x="470" y="{340 - i * 5.6:.1f}" width="16" height="6" '
                     f'fill="{_color_scale(v, lo, hi, exp.mode == "max")}"/>')
    parts.append(f'<text x="492" y="344">{lo:.3f}</text><text x="492" y="72">{hi:.3f}</text>')
    parts.append(f'<text x="470" y="58" font-size="11">{html.escape(exp.metric)}</text>')
    _legend_markers(parts, 455, 398)
    parts.append("</svg>")
    return "\n".join(parts)


def _legend_markers(parts: list[str], x0: float, y0: float) -> None:
    parts.append(f'<circle cx="{x0 - 380}" cy="{y0 + 10}" r="5" fill="#999" stroke="#333"/>'
                 f'<text x="{x0 - 370}" y="{y0 + 14}" font-size="11">done</text>')
    parts.append(f'<path d="M{x0 - 320},{y0 + 5} l10,10 m-10,0 l10,-10" stroke="#999" stroke-width="2.5"/>'
                 f'<text x="{x0 - 305}" y="{y0 + 14}" font-size="11">stopped early</text>')
    parts.append(f'<circle cx="{x0 - 215}" cy="{y0 + 10}" r="8" fill="none" stroke="#000" stroke-width="2"/>'
                 f'<text x="{x0 - 202}" y="{y0 + 14}" font-size="11">best</text>')


def plot_curves(exp: ExperimentSummary) -> str:
    """Metric vs epoch for every trial; × marks where ASHA stopped a trial."""
    w, h = 720, 440
    box = (70, 40, 520, 370)
    trials = [t for t in sorted_trials(exp) if t.curve]
    parts = _svg_open(w, h, f"learning curves ({exp.metric} per evaluation)")
    xs = [e for t in trials for e, _ in t.curve] + [0.0, exp.max_epochs]
    ys = [v for t in trials for _, v in t.curve]
    x = Scale(xs, box[0], box[2], pad=0.02, floor=0.0)
    y = Scale(ys, box[3], box[1], pad=0.08)
    _axes(parts, x, y, box, "epoch", exp.metric)
    keys = list(exp.space)[:2]
    for i, t in enumerate(trials):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in t.curve)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for e, v in t.curve[:-1]:
            parts.append(f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}"/>')
        e, v = t.curve[-1]
        parts.append(_marker(t, x(e), y(v), color, 5))
        ly = 52 + i * 18
        if ly < h - 10:
            label = f"{t.trial_id} " + " ".join(f"{short_key(k)}={fmt_value(t.params.get(k, ''))}" for k in keys)
            parts.append(f'<line x1="532" y1="{ly - 4}" x2="550" y2="{ly - 4}" stroke="{color}" stroke-width="3"/>'
                         f'<text x="555" y="{ly}" font-size="10">{html.escape(label)}</text>')
    parts.append(f'<circle cx="80" cy="{h - 12}" r="4" fill="#999" stroke="#333"/>'
                 f'<text x="88" y="{h - 8}" font-size="11">finished</text>'
                 f'<path d="M150,{h - 16} l8,8 m-8,0 l8,-8" stroke="#999" stroke-width="2.5"/>'
                 f'<text x="164" y="{h - 8}" font-size="11">stopped early{" by " + exp.scheduler.upper() if exp.scheduler == "asha" else ""}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def plot_metric_vs(exp: ExperimentSummary, key: str) -> str:
    """Best metric of each trial against one searched key (lr)."""
    return plot_space(exp, key, None).replace(
        f"best {exp.metric} over {short_key(key)}", f"best {exp.metric} vs {short_key(key)}", 1)


def make_plots(exp: ExperimentSummary) -> dict[str, tuple[str, str]]:
    """name → (caption, svg text)."""
    keys = list(exp.space)
    numeric = [k for k in keys if any(isinstance(t.params.get(k), (int, float))
                                      and not isinstance(t.params.get(k), bool) for t in exp.trials)]
    xkey = "train.lr" if "train.lr" in numeric else (numeric[0] if numeric else None)
    ykey = "train.weight_decay" if "train.weight_decay" in numeric and xkey != "train.weight_decay" else \
        next((k for k in numeric if k != xkey), None)
    plots: dict[str, tuple[str, str]] = {}
    if xkey and ykey:
        plots["space"] = (f"Best {exp.metric} of each trial over {short_key(xkey)} × {short_key(ykey)} "
                          "(green is better; the ringed point is the best trial).", plot_space(exp, xkey, ykey))
    plots["curves"] = (f"{exp.metric} at every evaluation of every trial; × marks a trial stopped early.",
                       plot_curves(exp))
    if xkey:
        plots["metric_vs_" + short_key(xkey)] = (f"Best {exp.metric} against {short_key(xkey)}.",
                                                 plot_metric_vs(exp, xkey))
    return plots
