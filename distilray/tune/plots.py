"""The report's figures: plotly, through an in-memory Optuna study where Optuna's plots fit.

The search's trials become an Optuna study (`build_study`: `create_trial` + `add_trials`, one
FrozenTrial per Tune trial: finished = COMPLETE with its best value, stopped by ASHA = PRUNED,
errored = FAIL, each with its evaluations as intermediate values), so the parallel coordinate,
contour, parameter importance and timeline plots are `optuna.visualization`'s — log axes for
log-uniform keys and categorical axes for choice/grid come from the study's distributions.
Two figures are plotly directly, because Optuna's versions drop what the report must show:
`plot_slice` keeps only COMPLETE trials and colours by trial number, so the "metric per key"
figure here adds the stopped trials as their own series; `plot_intermediate_values` takes
integer steps and does not mark where a trial was stopped, so the learning curves here run
over epochs with ASHA's rungs and × at each stop.

Colours: Viridis (perceptually uniform, readable with the common colour-vision deficiencies)
for values, Okabe-Ito for trial status. Value-coloured plots (parallel coordinate, contour)
hold only finished trials: a stopped trial's value is its value at the rung where it was
cut, which is not comparable with finished trials' final values.
"""

from __future__ import annotations

import contextlib
import datetime
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from distilray.tune.summary import ExperimentSummary, TrialSummary, fmt_value, short_key

STATUS_STYLE = {  # Okabe-Ito: told apart with any common colour-vision deficiency
    "done": ("finished", "#0072B2", "circle"),
    "stopped early": ("stopped early", "#E69F00", "x"),
    "error": ("error", "#D55E00", "square"),
    "unfinished": ("unfinished", "#999999", "diamond"),
}
VALUE_SCALE = "Viridis"
MIN_IMPORTANCE_TRIALS = 6
"""Finished trials PED-ANOVA needs before its top quantile holds more than one or two trials."""
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class Figure:
    """One figure of the report, or the reason it is not drawn."""

    name: str
    title: str
    caption: str
    fig: Any = None
    note: str = ""
    table: dict[str, float] | None = None
    """Numbers behind the figure that the Markdown report lists (importances)."""


# --------------------------------------------------------------------------- the Optuna study


def category(value: Any) -> str:
    """A choice/grid value as its category: Optuna plots numeric choices on a linear axis, where
    weight decay 0 and 0.01 would overlap; as strings they get one slot each."""
    return fmt_value(value)


def distributions(exp: ExperimentSummary) -> dict[str, Any]:
    """tune.space as Optuna distributions: log axes for loguniform, categories for choice/grid."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {}
    for key, spec in exp.space.items():
        kind = spec.get("type")
        if kind in ("loguniform", "uniform"):
            out[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=kind == "loguniform")
        elif kind in ("choice", "grid"):
            names = list(dict.fromkeys(category(v) for v in spec["values"]))
            out[key] = CategoricalDistribution(names)
    return out


def _when(ts: float | None) -> datetime.datetime | None:
    return None if ts is None else datetime.datetime.fromtimestamp(ts)


def frozen_trial(t: TrialSummary, dists: dict[str, Any]) -> Any:
    """One Tune trial as an Optuna FrozenTrial (None when its values are outside the space)."""
    from optuna.trial import TrialState, create_trial

    state = {"done": TrialState.COMPLETE, "stopped early": TrialState.PRUNED,
             "error": TrialState.FAIL}.get(t.status, TrialState.RUNNING)
    if state == TrialState.COMPLETE and t.best_value is None:
        state = TrialState.FAIL
    params = {k: category(t.params[k]) if hasattr(dists[k], "choices") else t.params[k]
              for k in dists if k in t.params}
    if len(params) != len(dists):
        return None
    start, end = _when(t.started), _when(t.ended)
    if state != TrialState.RUNNING and start is not None and end is None:
        end = start
    try:
        trial = create_trial(
            state=state, value=t.best_value if state == TrialState.COMPLETE else None,
            params=params, distributions={k: dists[k] for k in params},
            intermediate_values={s: v for s, (_, v) in zip(t.steps, t.curve, strict=False)},
            user_attrs={"trial_id": t.trial_id, "status": t.status})
    except ValueError:  # a value the space does not contain (the space was edited after the search)
        return None
    if start is not None:  # create_trial stamps "now"; the timeline needs the real times
        trial.datetime_start = start
        trial.datetime_complete = None if state == TrialState.RUNNING else end
    trial.set_user_attr("timed", start is not None)
    return trial


def build_study(exp: ExperimentSummary) -> Any:
    """The experiment's trials in an in-memory Optuna study, in the order they started."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if exp.mode == "max" else "minimize",
                                study_name=exp.name)
    dists = distributions(exp)
    trials = sorted(exp.trials, key=lambda t: (t.started is None, t.started or 0.0, t.trial_id))
    study.add_trials([ft for ft in (frozen_trial(t, dists) for t in trials) if ft is not None])
    return study


@contextlib.contextmanager
def _value_scale() -> Iterator[None]:
    """Optuna colours by its module-level COLOR_SCALE (Blues): swap in Viridis while plotting."""
    import plotly.colors
    from optuna.visualization import _contour, _parallel_coordinate

    modules = [m for m in (_parallel_coordinate, _contour) if hasattr(m, "COLOR_SCALE")]
    saved = [m.COLOR_SCALE for m in modules]
    viridis = plotly.colors.convert_colors_to_same_type(plotly.colors.sequential.Viridis, "rgb")[0]
    for m in modules:
        m.COLOR_SCALE = viridis  # Optuna interpolates between "rgb(r, g, b)" strings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning, few-trial warnings
            yield
    finally:
        for m, scale in zip(modules, saved, strict=True):
            m.COLOR_SCALE = scale


# --------------------------------------------------------------------------- plotly figures


def hover_text(exp: ExperimentSummary, t: TrialSummary, value: float | None, at: str) -> str:
    """Every parameter, the metric and the status of a trial, for its hover box."""
    lines = [f"<b>trial {t.trial_id}</b> ({STATUS_STYLE[t.status][0]})"]
    lines += [f"{k} = {fmt_value(t.params.get(k, ''))}" for k in exp.space]
    if value is not None:
        lines.append(f"{exp.metric} = {value:.4f} {at}")
    return "<br>".join(lines)


def _axis(exp: ExperimentSummary, key: str) -> dict[str, Any]:
    kind = exp.space_types.get(key)
    if kind == "loguniform":
        return {"type": "log"}
    if kind in ("choice", "grid"):
        return {"type": "category", "categoryorder": "array",
                "categoryarray": [fmt_value(v) for v in exp.space[key].get("values", [])]}
    return {"type": "linear"}


def _x(exp: ExperimentSummary, key: str, value: Any) -> Any:
    return fmt_value(value) if exp.space_types.get(key) in ("choice", "grid") else value


def plot_metric_per_key(exp: ExperimentSummary) -> go.Figure:
    """The metric against each searched key; finished and stopped trials as separate series."""
    keys = list(exp.space)
    fig = make_subplots(rows=1, cols=len(keys), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[short_key(k) for k in keys])
    best_id = (exp.best or {}).get("trial_id")
    for col, key in enumerate(keys, start=1):
        for status in ("done", "stopped early", "unfinished"):
            group = [t for t in exp.trials if t.status == status and t.curve and key in t.params]
            if not group:
                continue
            label, colour, symbol = STATUS_STYLE[status]
            at = "(best evaluation)" if status == "done" else "(at its last evaluation)"
            values = [t.best_value if status == "done" else t.curve[-1][1] for t in group]
            fig.add_trace(go.Scatter(
                x=[_x(exp, key, t.params[key]) for t in group], y=values, mode="markers",
                name=label + ("" if status == "done" else " (value when stopped)"), legendgroup=status,
                showlegend=col == 1,
                marker={"color": colour, "symbol": symbol, "size": 10, "opacity": 0.85,
                        "line": {"width": [3 if t.trial_id == best_id else 1 for t in group],
                                 "color": ["#000000" if t.trial_id == best_id else "#333333" for t in group]}},
                hovertext=[hover_text(exp, t, v, at) for t, v in zip(group, values, strict=True)],
                hoverinfo="text"), row=1, col=col)
        fig.update_xaxes(title_text=short_key(key), row=1, col=col, **_axis(exp, key))
    fig.update_yaxes(title_text=exp.metric, row=1, col=1)
    fig.update_layout(height=420, hovermode="closest", legend={"orientation": "h", "y": -0.22},
                      margin={"t": 40})
    return fig


def plot_learning_curves(exp: ExperimentSummary) -> go.Figure:
    """The metric at every evaluation of every trial over epochs; × where a trial was stopped."""
    fig = go.Figure()
    best_id = (exp.best or {}).get("trial_id")
    shown: set[str] = set()
    for t in sorted(exp.trials, key=lambda t: t.status != "done"):
        if not t.curve:
            continue
        label, colour, symbol = STATUS_STYLE[t.status]
        epochs, values = [e for e, _ in t.curve], [v for _, v in t.curve]
        stopped = t.status == "stopped early"
        fig.add_trace(go.Scatter(
            x=epochs, y=values, mode="lines+markers", name=label, legendgroup=t.status,
            showlegend=t.status not in shown,
            line={"color": "#000000" if t.trial_id == best_id else colour,
                  "width": 3 if t.trial_id == best_id else 1.5, "dash": "dot" if stopped else "solid"},
            marker={"symbol": ["circle"] * (len(epochs) - 1) + [symbol], "color": colour,
                    "size": [5] * (len(epochs) - 1) + [12 if stopped else 7]},
            hovertext=[hover_text(exp, t, v, f"at epoch {e:.2f}") for e, v in t.curve],
            hoverinfo="text"))
        shown.add(t.status)
    for rung in exp.rungs:
        fig.add_vline(x=rung, line={"color": "#888888", "dash": "dash", "width": 1},
                      annotation_text=f"rung {rung:g}", annotation_position="top")
    fig.update_layout(height=430, xaxis_title="epoch", yaxis_title=exp.metric, hovermode="closest",
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 40})
    return fig


def plot_seeds(exp: ExperimentSummary) -> go.Figure:
    """Each confirmed configuration's value per seed, with mean ± one standard deviation."""
    fig = go.Figure()
    names = [f"#{c.rank} {c.source}" for c in exp.confirm]
    for c, name in zip(exp.confirm, names, strict=True):
        params = "<br>".join(f"{k} = {fmt_value(v)}" for k, v in c.params.items())
        fig.add_trace(go.Scatter(
            x=[name] * len(c.values), y=c.values, mode="markers", showlegend=False,
            marker={"color": "#0072B2", "size": 9, "opacity": 0.8},
            hovertext=[f"<b>{name}</b> seed {s}<br>{params}<br>{exp.metric} = {v:.4f}"
                       for s, v in zip(c.seeds, c.values, strict=True)], hoverinfo="text"))
    fig.add_trace(go.Scatter(
        x=names, y=[c.mean for c in exp.confirm], mode="markers", name="mean ± std",
        marker={"symbol": "line-ew", "size": 30, "line": {"width": 3, "color": "#D55E00"}},
        error_y={"type": "data", "array": [c.spread for c in exp.confirm], "color": "#D55E00"},
        hoverinfo="skip"))
    fig.update_layout(height=380, xaxis_title="configuration (rank, source trial)",
                      yaxis_title=exp.metric, hovermode="closest", margin={"t": 30})
    return fig


# --------------------------------------------------------------------------- Optuna's figures


def _restyle_timeline(fig: go.Figure) -> go.Figure:
    names = {"COMPLETE": "done", "PRUNED": "stopped early", "FAIL": "error", "RUNNING": "unfinished"}
    for trace in fig.data:
        status = names.get(trace.name)
        if status:
            label, colour, _ = STATUS_STYLE[status]
            trace.update(name=label, marker={"color": colour},
                         hovertemplate=f"%{{text}}<extra>{label}</extra>")
    return fig


def importance_figure(exp: ExperimentSummary, study: Any, finished: int) -> Figure:
    """Parameter importances by PED-ANOVA, or why there are too few trials for them."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    caption = ("PED-ANOVA importance (Watanabe et al. 2023, Optuna's default): how much each key "
               "decides whether a finished trial lands in the top quantile of "
               f"{exp.metric}. Chosen over fANOVA and mean decrease in impurity, which fit a "
               "random forest (scikit-learn, not a dependency here) on a few dozen points at "
               "best; PED-ANOVA is closed-form over Parzen estimators and made for the top of a "
               "small search. Stopped and errored trials are left out.")
    fig = Figure("importance", "Parameter importance", caption)
    if len(exp.space) < 2:
        fig.note = "Only one key is searched: there is nothing to rank."
        return fig
    if finished < MIN_IMPORTANCE_TRIALS:
        fig.note = (f"Too few finished trials for importances: {finished} finished, "
                    f"PED-ANOVA needs at least {MIN_IMPORTANCE_TRIALS} here.")
        return fig
    # the top quantile holds at least 3 finished trials (default 0.1 is sized for hundreds)
    quantile = min(0.5, max(0.1, 3 / finished))
    evaluator = PedAnovaImportanceEvaluator(target_quantile=quantile)
    fig.caption += f" Top quantile: {quantile:.2f} of {finished} finished trials."
    fig.table = {k: float(v) for k, v in
                 optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    fig.fig = optuna.visualization.plot_param_importances(study, evaluator=evaluator,
                                                          target_name=exp.metric)
    fig.fig.update_traces(marker_color="#0072B2")
    fig.fig.update_layout(height=160 + 60 * len(exp.space))
    return fig


def optuna_figures(exp: ExperimentSummary, study: Any) -> list[Figure]:
    """Parallel coordinate, contour, importance and timeline from the study (or why not)."""
    import optuna.visualization as ov
    from optuna.trial import TrialState

    finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    figs = []
    par = Figure("parallel", "Parallel coordinates",
                 f"Every finished trial as one line through its values; colour = best {exp.metric} "
                 "(Viridis). Stopped trials are left out: their value is from the rung where "
                 "ASHA cut them.")
    contour = Figure("contour", "Contour per pair of keys",
                     f"Best {exp.metric} interpolated between finished trials (dots) for each pair "
                     "of searched keys; log axes for log-uniform keys, categories for choice/grid.")
    with _value_scale():
        if finished >= 2:
            par.fig = ov.plot_parallel_coordinate(study, target_name=exp.metric)
        else:
            par.note = f"Needs at least 2 finished trials; {finished} finished."
        if len(exp.space) < 2:
            contour.note = "Only one key is searched: see the metric per key above."
        elif finished >= 3:
            contour.fig = ov.plot_contour(study, target_name=exp.metric)
            contour.fig.update_traces(colorscale=VALUE_SCALE, selector={"type": "contour"})
            if len(exp.space) > 2:  # a matrix of pairs: give each row room
                contour.fig.update_layout(height=260 * len(exp.space))
        else:
            contour.note = f"Needs at least 3 finished trials; {finished} finished."
        figs += [par, contour, importance_figure(exp, study, finished)]
        timeline = Figure("timeline", "Timeline",
                          "When each trial ran, coloured by how it ended (hover: its parameters).")
        trials = study.get_trials(deepcopy=False)
        timed = [t for t in trials if t.user_attrs.get("timed")]
        if timed and len(timed) == len(trials):
            timeline.fig = _restyle_timeline(ov.plot_timeline(study))
        else:
            timeline.note = (f"{len(timed)} of {len(trials)} trials recorded when they ran "
                             "(events.jsonl without times): no timeline.")
        figs.append(timeline)
    for f in figs:
        if f.fig is not None:
            f.fig.update_layout(title=None, margin={"t": 30})
    return figs


def make_figures(exp: ExperimentSummary) -> list[Figure]:
    """Every figure of the report, in the order it shows them."""
    figs = []
    with_curve = [t for t in exp.trials if t.curve]
    per_key = Figure("metric_per_key", f"{exp.metric} per searched key",
                     f"Best {exp.metric} of each finished trial (blue ●), and the value at which "
                     "each stopped trial was cut (orange ×, not a final value); the best trial "
                     "has a thick outline.")
    curves = Figure("curves", "Learning curves",
                    f"{exp.metric} at every evaluation; dotted with × at the end: stopped early"
                    + (f" by ASHA (dashed lines: its rungs at epochs {', '.join(f'{r:g}' for r in exp.rungs)})"
                       if exp.rungs else "") + "; black: the best trial.")
    if with_curve and exp.space:
        per_key.fig = plot_metric_per_key(exp)
        curves.fig = plot_learning_curves(exp)
    else:
        per_key.note = curves.note = "No trial has reported an evaluation yet."
    figs += [per_key, curves]
    if exp.space:
        figs += optuna_figures(exp, build_study(exp))
    if exp.confirm:
        seeds = Figure("seeds", "Seed noise", f"{exp.metric} of each confirmed configuration for "
                       "every seed (the search's own run is the first), with mean ± one standard "
                       "deviation.", plot_seeds(exp))
        figs.append(seeds)
    return figs

