"""`distilray report EXPERIMENT`: trials.csv, report.md and a self-contained report.html.

Reads only files (no Ray), through `summary`; the figures come from `plots`, embedded in the
HTML as data: URIs and written to plots/ for the Markdown report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from distilray.files import write_text_atomic
from distilray.tune.plots import make_plots
from distilray.tune.summary import (
    ExperimentSummary,
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


# --------------------------------------------------------------------------- documents


CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left;font-family:monospace}
tr.best td{background:#e6f4ea;font-weight:bold} tr.stopped td{color:#777}
tr.error td{background:#fde8e8}
.box{background:#f6f8fa;border:1px solid #ddd;padding:10px 14px;border-radius:4px}
code,pre{font-family:Menlo,Consolas,monospace;font-size:13px} figure{margin:16px 0}
figcaption{color:#555;font-size:13px} img.plot{max-width:100%;border:1px solid #eee}
"""

# Marks the page once every plot has decoded, so a headless browser test can tell.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot');
  var ok = Array.prototype.filter.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-plots-rendered', ok.length + '/' + imgs.length);
});
"""


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
    restarted = [t for t in sorted(exp.trials, key=lambda t: t.trial_id) if t.restarts]
    if restarted:
        lines.append("Retried from a checkpoint after a failure (a lost worker, node or trial driver): "
                     + ", ".join(f"trial {t.trial_id} ({t.restarts}×)" for t in restarted) + ".")
    return lines


def _best_lines(exp: ExperimentSummary) -> tuple[list[str], str | None]:
    if not exp.best:
        return ["No best checkpoint yet."], None
    b = exp.best
    metrics = b.get("metrics", {})
    lines = [f"Trial {b['trial_id']}, {exp.metric} {metrics.get(exp.metric, float('nan')):.4f} "
             f"at step {b.get('step')} (epoch {metrics.get('epoch', float('nan')):.2f})"]
    lines += [f"{k} = {fmt_value(v)}" for k, v in b.get("params", {}).items()]
    return lines, f"distilray serve --experiment {exp.dir}"


def render_html(exp: ExperimentSummary, plots: dict[str, tuple[str, str]]) -> str:
    header, rows = table_rows(exp)
    best_id = (exp.best or {}).get("trial_id")
    best_lines, serve_cmd = _best_lines(exp)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>distilray tune report — {html.escape(exp.name)}</title>",
           f"<style>{CSS}</style></head><body>",
           f"<h1>Tune report: {html.escape(exp.name)}</h1>",
           f'<p class="sub">{html.escape(str(exp.dir))}</p>']
    out += [f"<p>{html.escape(line)}</p>" for line in _summary_lines(exp)]
    out.append('<h2>Best configuration</h2><div class="box" id="best">')
    out += [f"<div>{html.escape(line)}</div>" for line in best_lines]
    if serve_cmd:
        out.append(f"<p>Serve it:</p><pre>{html.escape(serve_cmd)}</pre>")
    out.append("</div>")
    out.append('<h2>Trials</h2><table id="trials"><thead><tr>'
               + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>")
    for row in rows:
        cls = "best" if row[0] == best_id else {"stopped early": "stopped", "error": "error"}.get(row[-2], "")
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    out.append("<h2>Plots</h2>")
    for name, (caption, svg) in plots.items():
        data = base64.b64encode(svg.encode()).decode()
        out.append(f'<figure><img class="plot" id="plot-{name}" alt="{html.escape(caption)}" '
                   f'src="data:image/svg+xml;base64,{data}"><figcaption>{html.escape(caption)}'
                   "</figcaption></figure>")
    out.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "\n".join(out)


def render_markdown(exp: ExperimentSummary, plots: dict[str, tuple[str, str]]) -> str:
    header, rows = table_rows(exp)
    best_lines, serve_cmd = _best_lines(exp)
    out = [f"# Tune report: {exp.name}", "", f"`{exp.dir}`", ""]
    out += [*_summary_lines(exp), "", "## Best configuration", ""]
    out += [f"- {line}" for line in best_lines]
    if serve_cmd:
        out += ["", "Serve it:", "", "```bash", serve_cmd, "```"]
    out += ["", "## Trials", "", "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "## Plots", ""]
    for name, (caption, _) in plots.items():
        out += [f"![{caption}](plots/{name}.svg)", "", f"*{caption}*", ""]
    return "\n".join(out)


def write_report(exp_dir: str | Path) -> dict[str, str]:
    """Write trials.csv, report.md (+ plots/*.svg) and report.html; returns their paths."""
    exp = load_experiment_summary(exp_dir)
    plots = make_plots(exp)
    plot_dir = exp.dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    for name, (_, svg) in plots.items():
        write_text_atomic(plot_dir / f"{name}.svg", svg)
    paths = {"csv": exp.dir / "trials.csv", "md": exp.dir / "report.md", "html": exp.dir / "report.html"}
    write_csv(exp, paths["csv"])
    write_text_atomic(paths["md"], render_markdown(exp, plots))
    write_text_atomic(paths["html"], render_html(exp, plots))
    return {k: str(v) for k, v in paths.items()}
