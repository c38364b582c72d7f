"""`distilray report EXPERIMENT`: trials.csv, report.md and a self-contained report.html.

Reads only files (no Ray), through `summary`; the figures come from `plots` (plotly). The HTML
carries plotly.js inline once and every figure's data, so it opens from disk with no network;
the Markdown report has the same tables and points to the HTML for the figures.
"""

from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

from distilray.files import write_text_atomic
from distilray.tune.plots import PLOTLY_CONFIG, Figure, make_figures
from distilray.tune.summary import (
    ConfirmedConfig,
    ExperimentSummary,
    TrialSummary,
    fmt_value,
    load_experiment_summary,
    short_key,
    sorted_trials,
)

STATUS_ORDER = {"done": 0, "stopped early": 1, "unfinished": 2, "error": 3}


def table_rows(exp: ExperimentSummary) -> tuple[list[str], list[list[str]]]:
    keys = list(exp.space)
    header = ["trial", *[short_key(k) for k in keys], f"best {exp.metric}", "at epoch", "epochs run",
              "stopped early", "status", "time (s)"]
    rows = []
    for t in sorted_trials(exp):
        rows.append([t.trial_id, *[fmt_value(t.params.get(k, "")) for k in keys],
                     f"{t.best_value:.4f}" if t.best_value is not None else "—",
                     f"{t.best_epoch:.2f}" if t.best_epoch is not None else "—",
                     f"{t.epochs_run:.2f}", "yes" if t.stopped_early else "no", t.status,
                     f"{t.time_s:.0f}"])
    return header, rows


def write_csv(exp: ExperimentSummary, path: Path) -> None:
    keys = list(exp.space)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial_id", *keys, f"best_{exp.metric}", "best_epoch", "final_" + exp.metric,
                     "epochs_run", "stopped_early", "status", "time_s"])
    for t in sorted_trials(exp):
        writer.writerow([t.trial_id, *[t.params.get(k, "") for k in keys],
                         "" if t.best_value is None else t.best_value,
                         "" if t.best_epoch is None else t.best_epoch,
                         t.curve[-1][1] if t.curve else "", t.epochs_run,
                         str(t.stopped_early).lower(), t.status, round(t.time_s, 1)])
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- what the documents say


def _summary_lines(exp: ExperimentSummary) -> list[str]:
    counts: dict[str, int] = {}
    for t in exp.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    epochs = sum(t.epochs_run for t in exp.trials)
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: STATUS_ORDER.get(kv[0], 9)))
    lines = [f"{len(exp.trials)} trials ({status or 'none yet'}); scheduler {exp.scheduler}, "
             f"optimising {exp.metric} ({exp.mode}).",
             f"Trial-epochs run: {epochs:.1f} of {len(exp.trials) * exp.max_epochs:g} "
             f"({len(exp.trials)} trials × {exp.max_epochs:g} epochs) — "
             f"{100 * epochs / max(1e-9, len(exp.trials) * exp.max_epochs):.0f}%."]
    if exp.confirm_planned or exp.confirm:
        runs = [r for c in exp.confirm for r in c.runs]
        extra = sum(r.epochs_run for r in runs)
        lines.append(f"Seed confirmation: {len(runs)} of {exp.confirm_planned} extra runs "
                     f"({extra:.1f} trial-epochs); budget in all: {epochs + extra:.1f} trial-epochs "
                     f"({epochs:.1f} search + {extra:.1f} confirmation).")
    restarted = [t for t in sorted(exp.trials, key=lambda t: t.trial_id) if t.restarts]
    if restarted:
        lines.append("Retried from a checkpoint after a failure (a lost worker, node or trial driver): "
                     + ", ".join(f"trial {t.trial_id} ({t.restarts}×)" for t in restarted) + ".")
    return lines


def _best_lines(exp: ExperimentSummary) -> tuple[list[str], dict[str, str]]:
    """What the best configuration box says, and its commands (serve, pipeline, retrain)."""
    if not exp.best:
        return ["No best checkpoint yet."], {}
    b = exp.best
    metrics = b.get("metrics", {})
    lines = [f"Trial {b['trial_id']}, {exp.metric} {metrics.get(exp.metric, float('nan')):.4f} "
             f"at step {b.get('step')} (epoch {metrics.get('epoch', float('nan')):.2f})"]
    params = b.get("params", {})
    lines += [f"{k} = {fmt_value(v)}" for k, v in params.items()]
    sets = " ".join(f"--set {k}={v!r}" for k, v in params.items())
    commands = {
        "Serve it": f"distilray serve --experiment {exp.dir}",
        "Use it in Python (transformers.pipeline loads best/ as it is)":
            "from transformers import pipeline\n\n"
            f'clf = pipeline("text-classification", model="{exp.dir / "best"}")\n'
            'print(clf(["a gorgeous, witty film", "a dull, lifeless mess"]))',
        "Train it again (one run with these values)":
            f"distilray train --config {exp.dir / 'config.yaml'} {sets}".rstrip(),
    }
    return lines, commands


def seed_rows(exp: ExperimentSummary) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "source trial", *[short_key(k) for k in exp.space], "runs",
              f"mean {exp.metric} ± std", "min – max", "per seed"]
    rows = []
    for c in exp.confirm:
        rows.append([f"#{c.rank}", c.source, *[fmt_value(c.params.get(k, "")) for k in exp.space],
                     str(len(c.values)), f"{c.mean:.4f} ± {c.spread:.4f}" if c.values else "—",
                     f"{min(c.values):.4f} – {max(c.values):.4f}" if c.values else "—",
                     ", ".join(f"{s}: {v:.4f}" for s, v in zip(c.seeds, c.values, strict=True))])
    return header, rows


def seed_verdict(exp: ExperimentSummary) -> list[str]:
    """Plain words: does the best configuration beat the second by more than seed noise?"""
    ranked: list[ConfirmedConfig] = sorted(
        (c for c in exp.confirm if c.values), key=lambda c: -c.mean if exp.mode == "max" else c.mean)
    if not ranked:
        return ["No confirmation run has finished."] if exp.confirm_planned else []
    seeds = max(len(c.values) for c in ranked)
    if len(ranked) == 1:
        return [f"Only one configuration was confirmed: {exp.metric} {ranked[0].mean:.4f} ± "
                f"{ranked[0].spread:.4f} over {seeds} seeds."]
    first, second = ranked[0], ranked[1]
    lead, spread = abs(first.mean - second.mean), max(first.spread, second.spread)
    lines = []
    if lead > spread:
        lines.append(f"The best configuration's lead over the second ({lead:.4f} in mean {exp.metric}) "
                     f"is larger than the seed spread ({spread:.4f}, the larger standard deviation "
                     "of the two): the ranking holds across these seeds.")
    else:
        lines.append(f"The best configuration's lead over the second ({lead:.4f} in mean {exp.metric}) "
                     f"is NOT larger than the seed spread ({spread:.4f}, the larger standard deviation "
                     "of the two): with these seeds the two configurations cannot be told apart.")
    if first.rank != 1:
        top = next((c.source for c in exp.confirm if c.rank == 1), "?")
        lines.append(f"By mean over seeds, the search's #{first.rank} ({first.source}) ranks first, "
                     f"not its best trial ({top}).")
    lines.append(f"Means over up to {seeds} runs each (the search's run + "
                 f"{seeds - 1} more seeds): a rough check against seed noise, not a significance test.")
    return lines


# --------------------------------------------------------------------------- HTML


CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 4px}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left;font-family:monospace}
tr.best td{background:#e8f1fa;font-weight:bold} tr.stopped td{color:#777}
tr.error td{background:#fdf0e6} tr.errtext td{text-align:left;background:#fffaf5}
.box{background:#f6f8fa;border:1px solid #ddd;padding:10px 14px;border-radius:4px}
code,pre{font-family:Menlo,Consolas,monospace;font-size:13px} pre{white-space:pre-wrap;margin:4px 0}
figure{margin:10px 0 22px} figcaption{color:#555;font-size:13px} .note{color:#8a5a00}
.verdict{font-weight:bold}
"""

# Marks the page once every plotly figure has drawn its SVG, so a headless browser test can tell.
CHECK_SCRIPT = """
(function () {
  function check(tries) {
    var divs = document.querySelectorAll('div.plotly-graph-div');
    var ok = Array.prototype.filter.call(divs, function (d) {
      var svg = d.querySelector('svg.main-svg'); return svg && svg.querySelectorAll('path').length > 0;
    });
    document.body.setAttribute('data-plots-rendered', ok.length + '/' + divs.length);
    if (ok.length < divs.length && tries > 0) setTimeout(function () { check(tries - 1); }, 100);
  }
  window.addEventListener('load', function () { check(100); });
})();
"""


def plotly_js() -> str:
    """plotly.js as shipped with the plotly package, to inline once (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _e(text: object) -> str:
    return html.escape(str(text))


def _trial_cells(exp: ExperimentSummary, row: list[str], t: TrialSummary) -> str:
    href = os.path.relpath(t.dir, exp.dir) + "/" if t.dir else ""
    first = f'<a href="{_e(href)}">{_e(row[0])}</a>' if href else _e(row[0])
    return f"<td>{first}</td>" + "".join(f"<td>{_e(c)}</td>" for c in row[1:])


def _html_trials(exp: ExperimentSummary) -> list[str]:
    header, rows = table_rows(exp)
    best_id = (exp.best or {}).get("trial_id")
    out = ['<h2>Trials</h2><p class="sub">Each trial id links to its directory (params.json, '
           'result.json, error.txt).</p><table id="trials"><thead><tr>'
           + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row, t in zip(rows, sorted_trials(exp), strict=True):
        cls = "best" if t.trial_id == best_id else {"stopped early": "stopped", "error": "error"}.get(t.status, "")
        out.append(f'<tr class="{cls}" data-trial="{_e(t.trial_id)}">{_trial_cells(exp, row, t)}</tr>')
        if t.error:
            out.append(f'<tr class="errtext"><td colspan="{len(header)}"><pre>'
                       f"{_e(chr(10).join(t.error))}</pre></td></tr>")
    out.append("</tbody></table>")
    return out


def _html_seeds(exp: ExperimentSummary) -> list[str]:
    if not (exp.confirm or exp.confirm_planned):
        return []
    header, rows = seed_rows(exp)
    out = ['<h2 id="seeds">Seed noise</h2>']
    out += [f'<p class="verdict">{_e(line)}</p>' for line in seed_verdict(exp)[:1]]
    out += [f"<p>{_e(line)}</p>" for line in seed_verdict(exp)[1:]]
    out.append('<table id="seed-table"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header)
               + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
    out.append("</tbody></table>")
    return out


def _html_figure(f: Figure) -> str:
    head = f'<figure id="figure-{f.name}"><h3>{_e(f.title)}</h3>'
    if f.fig is None:
        return head + f'<p class="note">{_e(f.note)}</p><figcaption>{_e(f.caption)}</figcaption></figure>'
    body = f.fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{f.name}",
                         config=PLOTLY_CONFIG, default_width="100%")
    return head + body + f"<figcaption>{_e(f.caption)}</figcaption></figure>"


def render_html(exp: ExperimentSummary, figures: list[Figure]) -> str:
    best_lines, commands = _best_lines(exp)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>distilray tune report — {_e(exp.name)}</title>",
           f"<style>{CSS}</style>", f"<script>{plotly_js()}</script></head><body>",
           f"<h1>Tune report: {_e(exp.name)}</h1>", f'<p class="sub">{_e(exp.dir)}</p>']
    out += [f"<p>{_e(line)}</p>" for line in _summary_lines(exp)]
    out.append('<h2>Best configuration</h2><div class="box" id="best">')
    out += [f"<div>{_e(line)}</div>" for line in best_lines]
    for what, command in commands.items():
        out.append(f"<p>{_e(what)}:</p><pre>{_e(command)}</pre>")
    out.append("</div>")
    out += _html_seeds(exp)
    out += _html_trials(exp)
    out.append("<h2>Plots</h2>")
    out += [_html_figure(f) for f in figures]
    out.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "\n".join(out)


# --------------------------------------------------------------------------- Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_markdown(exp: ExperimentSummary, figures: list[Figure]) -> str:
    best_lines, commands = _best_lines(exp)
    out = [f"# Tune report: {exp.name}", "", f"`{exp.dir}`", ""]
    out += [*_summary_lines(exp), "", "## Best configuration", ""]
    out += [f"- {line}" for line in best_lines]
    for what, command in commands.items():
        out += ["", f"{what}:", "", "```python" if "import" in command else "```bash", command, "```"]
    if exp.confirm or exp.confirm_planned:
        out += ["", "## Seed noise", "", *seed_verdict(exp), "", *_md_table(*seed_rows(exp))]
    out += ["", "## Trials", "", *_md_table(*table_rows(exp))]
    errored = [t for t in sorted_trials(exp) if t.error]
    for t in errored:
        out += ["", f"Trial {t.trial_id} failed:", "", "```", *t.error, "```"]
    out += ["", "## Plots", "", "Interactive in report.html: "
            + ", ".join(f.title.lower() for f in figures if f.fig is not None) + "."]
    for f in figures:
        if f.table:
            out += ["", f"{f.title}:", "", *_md_table(["key", "importance"],
                                                      [[k, f"{v:.3f}"] for k, v in f.table.items()])]
        if f.fig is None and f.note:
            out += ["", f"{f.title}: {f.note}"]
    return "\n".join(out) + "\n"


def write_report(exp_dir: str | Path) -> dict[str, str]:
    """Write trials.csv, report.md and report.html; returns their paths."""
    exp = load_experiment_summary(exp_dir)
    figures = make_figures(exp)
    paths = {"csv": exp.dir / "trials.csv", "md": exp.dir / "report.md", "html": exp.dir / "report.html"}
    write_csv(exp, paths["csv"])
    write_text_atomic(paths["md"], render_markdown(exp, figures))
    write_text_atomic(paths["html"], render_html(exp, figures))
    return {k: str(v) for k, v in paths.items()}
