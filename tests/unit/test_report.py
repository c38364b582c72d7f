"""`distilray report` from files alone: trial summaries, CSV/Markdown/HTML, plotly figures, a real browser."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from distilray.config import dump_config, load_config
from distilray.tune.report import write_report
from distilray.tune.summary import load_experiment_summary

SPACE = ("tune.space={train.lr: {type: loguniform, low: 1.0e-7, high: 0.5}, "
         "train.weight_decay: {type: choice, values: [0.0, 0.01, 1.0]}}")


def rows_for(trial_id: str, accs: list[float], total_steps: int = 40, steps_per_epoch: int = 10,
             t0: float = 0.0) -> list[dict]:
    return [{"trial_id": trial_id, "epoch": (i + 1) * 1.0, "step": (i + 1) * steps_per_epoch,
             "eval_accuracy": a, "eval_loss": 1 - a, "total_steps": total_steps,
             "steps_per_epoch": steps_per_epoch, "time_total_s": t0 + 5.0 * (i + 1),
             "training_iteration": i + 1} for i, a in enumerate(accs)]


def make_experiment(root: Path, name: str = "exp") -> Path:
    """An experiment directory laid out as `distilray tune` leaves it (4 trials, one of each status)."""
    exp = root / name
    exp.mkdir(parents=True)
    cfg = load_config(None, ["model.name=tiny", "train.epochs=4", SPACE, f"tune.name={name}"])
    (exp / "config.yaml").write_text(dump_config(cfg))
    trials = {
        "a1b2c_00000": ({"train.lr": 2e-3, "train.weight_decay": 0.01}, rows_for("a1b2c_00000", [0.6, 0.7, 0.75, 0.78])),
        "a1b2c_00001": ({"train.lr": 1e-7, "train.weight_decay": 0.0}, rows_for("a1b2c_00001", [0.5])),
        "a1b2c_00002": ({"train.lr": 0.5, "train.weight_decay": 1.0}, rows_for("a1b2c_00002", [0.49, 0.495])),
        "a1b2c_00003": ({"train.lr": 5e-4, "train.weight_decay": 0.0}, []),
    }
    # a00 was resumed after a driver crash: its timer restarts and step 20 is reported twice
    a00 = trials["a1b2c_00000"][1]
    trials["a1b2c_00000"] = (trials["a1b2c_00000"][0],
                             a00[:2] + [dict(a00[1], time_total_s=2.0)] +
                             [dict(r, time_total_s=r["time_total_s"] - 8.0) for r in a00[2:]])
    for i, (tid, (params, rows)) in enumerate(trials.items()):
        d = exp / f"run_trial_{tid}_{i}_lr={params['train.lr']:.4f}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(params))
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (exp / "run_trial_a1b2c_00003_3_lr=0.0005" / "error.txt").write_text("Traceback: boom")
    events = [{"trial_id": "a1b2c_00001", "state": "stopped early (ASHA)"},
              {"trial_id": "a1b2c_00002", "state": "stopped early (ASHA)"},
              {"trial_id": "a1b2c_00000", "state": "done"}]
    (exp / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn')
    (exp / "best.json").write_text(json.dumps({
        "trial_id": "a1b2c_00000", "step": 40, "params": trials["a1b2c_00000"][0],
        "metrics": {"eval_accuracy": 0.78, "epoch": 4.0}}))
    return exp


def test_trial_summaries_cover_status_curves_resumes_and_time(tmp_path):
    exp = load_experiment_summary(make_experiment(tmp_path))
    by_id = {t.trial_id: t for t in exp.trials}
    assert sorted(by_id) == ["a1b2c_00000", "a1b2c_00001", "a1b2c_00002", "a1b2c_00003"]
    done, low, high, err = (by_id[f"a1b2c_0000{i}"] for i in range(4))
    assert done.status == "done" and not done.stopped_early
    assert [e for e, _ in done.curve] == [1.0, 2.0, 3.0, 4.0], "a step reported twice counts once"
    assert done.best_value == 0.78 and done.best_epoch == 4.0 and done.epochs_run == 4.0
    assert done.time_s == pytest.approx(10.0 + 12.0), "time of both segments of a resumed trial"
    assert low.status == high.status == "stopped early" and low.epochs_run == 1.0
    assert err.status == "error" and err.best_value is None
    assert exp.metric == "eval_accuracy" and exp.max_epochs == 4 and exp.best["trial_id"] == "a1b2c_00000"


def test_report_files_list_every_trial(tmp_path):
    exp_dir = make_experiment(tmp_path)
    paths = write_report(exp_dir)
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in rows] == ["a1b2c_00000", "a1b2c_00001", "a1b2c_00002", "a1b2c_00003"]
    assert [r["stopped_early"] for r in rows] == ["false", "true", "true", "false"]
    assert [r["status"] for r in rows] == ["done", "stopped early", "stopped early", "error"]
    assert rows[0]["train.lr"] == "0.002" and rows[0]["best_eval_accuracy"] == "0.78"
    assert rows[0]["epochs_run"] == "4.0" and rows[2]["epochs_run"] == "2.0"
    md = Path(paths["md"]).read_text()
    for tid in ("a1b2c_00000", "a1b2c_00001", "a1b2c_00002", "a1b2c_00003"):
        assert f"| {tid} |" in md
    assert f"distilray serve --experiment {exp_dir}" in md
    assert "Trial-epochs run: 7.0 of 16 (4 trials × 4 epochs) — 44%." in md
    assert "](plots/" not in md and "Interactive in report.html: " in md
    page = Path(paths["html"]).read_text()
    assert page.count('class="plotly-graph-div"') == len(figure_divs(page)) >= 2
    assert page.count("<tr class=") == 4 + 1, "4 trials and the errored trial's error text"
    assert "Traceback: boom" in page and "Trial a1b2c_00003 failed:" in md
    assert not (exp_dir / "plots").exists()


def test_report_of_a_directory_that_is_not_an_experiment(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distilray", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "is not a distilray tune experiment (no config.yaml)" in out.stderr


# --------------------------------------------------------------------------- headless Chromium




# --------------------------------------------------------------------------- synthetic searches


def figure_divs(page: str) -> list[str]:
    """The ids of the plotly figures a report page draws."""
    return re.findall(r'<div id="plot-([a-z_]+)" class="plotly-graph-div"', page)


def accuracy(params: dict, epoch: float) -> float:
    """A made-up but smooth response: best near lr 1e-4, wd hurts a little, rises with epochs."""
    lr = params["train.lr"]
    peak = 0.9 - 0.08 * (math.log10(lr) + 4) ** 2 - 0.3 * params.get("train.weight_decay", 0.0)
    peak += 0.02 * params.get("train.warmup_ratio", 0.0)
    return round(max(0.5, peak - 0.15 / epoch), 4)


def synthetic_experiment(root: Path, name: str, space: str, params: list[dict], *, epochs: int = 3,
                         stop_at: dict[int, int] | None = None, errors: dict[int, str] | None = None,
                         extra: tuple[str, ...] = ()) -> Path:
    """An experiment directory as `distilray tune` leaves it: trial i stops at stop_at[i] epochs
    (ASHA), errors[i] is trial i's error.txt; the others run all epochs."""
    stop_at, errors = stop_at or {}, errors or {}
    exp = root / name
    exp.mkdir(parents=True)
    cfg = load_config(None, ["model.name=tiny", f"train.epochs={epochs}", space, f"tune.name={name}",
                             "tune.scheduler=asha", *extra])
    (exp / "config.yaml").write_text(dump_config(cfg))
    events, t0, best = [], 1_700_000_000.0, None
    for i, p in enumerate(params):
        tid = f"f00d{i % 10}_{i:05d}"
        start = t0 + 20.0 * (i // 2)  # two at a time
        n = 0 if i in errors else stop_at.get(i, epochs)
        accs = [accuracy(p, e + 1) for e in range(n)]
        rows = rows_for(tid, accs, total_steps=10 * epochs, t0=0.0)
        for r in rows:
            r["timestamp"] = int(start + r["time_total_s"])
        d = exp / f"run_trial_{tid}_{i}_lr={p['train.lr']:.2e}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(p))
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        events.append({"time": start, "trial_id": tid, "state": "running", "params": p})
        if i in errors:
            (d / "error.txt").write_text(errors[i])
            events.append({"time": start + 3.0, "trial_id": tid, "state": "error"})
        else:
            state = "done" if n == epochs else "stopped early (ASHA)"
            events.append({"time": start + 5.0 * n, "trial_id": tid, "state": state})
            if best is None or accs[-1] > best[1]:
                best = (tid, max(accs), p, 10 * n)
    (exp / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    tid, value, p, step = best
    (exp / "best.json").write_text(json.dumps({"trial_id": tid, "step": step, "params": p,
                                               "metrics": {"eval_accuracy": value, "epoch": float(epochs)}}))
    return exp


LR_WD = ("tune.space={train.lr: {type: loguniform, low: 1e-5, high: 1e-3}, "
         "train.weight_decay: {type: choice, values: [0, 0.01, 0.1]}}")
THREE = ("tune.space={train.lr: {type: loguniform, low: 1e-5, high: 1e-3}, "
         "train.weight_decay: {type: uniform, low: 0.0, high: 0.1}, "
         "train.warmup_ratio: {type: choice, values: [0.0, 0.1]}}")
ERROR = ("Failure # 1 (occurred at 2026-12-01_10-00-00)\nTraceback (most recent call last):\n"
         '  File "run.py", line 1, in fit\n    step()\n  File "loop.py", line 9, in step\n'
         "    loss.backward()\n  File \"torch.py\", line 3\n    raise\n"
         "RuntimeError: CUDA out of memory: tried to allocate 2.00 GiB\n")


def lr_wd_params(n: int) -> list[dict]:
    return [{"train.lr": 10 ** (-5 + 2 * (i * 7 % n) / (n - 1)), "train.weight_decay": [0.0, 0.01, 0.1][i % 3]}
            for i in range(n)]


def three_key_params(n: int) -> list[dict]:
    return [{"train.lr": 10 ** (-5 + 2 * (i * 5 % n) / (n - 1)), "train.weight_decay": 0.1 * (i * 3 % n) / n,
             "train.warmup_ratio": [0.0, 0.1][i % 2]} for i in range(n)]


def plot_json(page: str, name: str) -> dict:
    """The data and layout plotly draws for figure `name` (from the Plotly.newPlot call)."""
    start = page.index(f'"plot-{name}",') + len(f'"plot-{name}",')
    data, end = json.JSONDecoder().raw_decode(page[start:].lstrip())
    rest = page[start:].lstrip()[end:].lstrip(", ")
    layout, _ = json.JSONDecoder().raw_decode(rest)
    return {"data": data, "layout": layout}


def test_report_of_a_three_trial_search(tmp_path):
    exp_dir = synthetic_experiment(tmp_path, "three", LR_WD, lr_wd_params(3))
    page = Path(write_report(exp_dir)["html"]).read_text()
    assert figure_divs(page) == ["metric_per_key", "curves", "parallel", "contour", "timeline"]
    assert "Too few finished trials for importances: 3 finished, PED-ANOVA needs at least 6" in page
    assert page.count("<tr class=") == 3 and "error" not in [m for m in re.findall(r'<tr class="(\w*)"', page)]
    per_key = plot_json(page, "metric_per_key")
    assert per_key["layout"]["xaxis"]["type"] == "log"
    assert per_key["layout"]["xaxis2"]["type"] == "category"
    assert per_key["layout"]["xaxis2"]["categoryarray"] == ["0", "0.01", "0.1"], "0 and 0.01 apart"


def test_report_of_sixteen_trials_over_lr_and_weight_decay(tmp_path):
    params = lr_wd_params(16)
    exp_dir = synthetic_experiment(tmp_path, "sixteen", LR_WD, params, stop_at={3: 1, 7: 1, 11: 1})
    page = Path(write_report(exp_dir)["html"]).read_text()
    assert figure_divs(page) == ["metric_per_key", "curves", "parallel", "contour", "importance", "timeline"]
    assert page.count("<script>") == 2 + 6, "plotly.js once, the page check, one call per figure"
    assert page.count("Plotly.newPlot") == 6 and 'src="http' not in page and "cdn.plot.ly/plotly" not in page
    per_key = plot_json(page, "metric_per_key")
    finished, stopped = (next(t for t in per_key["data"] if t["name"].startswith(n) and t["xaxis"] == "x")
                         for n in ("finished", "stopped early"))
    assert len(finished["x"]) == 13 and len(stopped["x"]) == 3
    assert finished["marker"]["color"] != stopped["marker"]["color"]
    assert finished["marker"]["symbol"] == "circle" and stopped["marker"]["symbol"] == "x"
    assert "train.lr = " in finished["hovertext"][0] and "train.weight_decay = " in finished["hovertext"][0]
    assert "eval_accuracy = " in stopped["hovertext"][0] and "at its last evaluation" in stopped["hovertext"][0]
    # value-coloured plots hold finished trials only, on Viridis
    contour = plot_json(page, "contour")
    (levels,) = [t for t in contour["data"] if t["type"] == "contour"]
    assert levels["colorscale"][0][1].lower() in ("#440154", "rgb(68, 1, 84)"), "Viridis starts at #440154"
    assert contour["layout"]["xaxis"]["type"] == "log"
    assert contour["layout"]["yaxis"]["type"] == "category", "choice wd: 0, 0.01 and 0.1 one slot each"
    parallel = plot_json(page, "parallel")
    assert any("rgb(68, 1, 84)" in json.dumps(t) for t in parallel["data"]), "Viridis' first colour"
    importance = plot_json(page, "importance")
    (bars,) = importance["data"]
    assert sorted(bars["y"]) == ["train.lr", "train.weight_decay"]
    importances = dict(zip(bars["y"], bars["x"], strict=True))
    assert importances["train.lr"] > importances["train.weight_decay"], importances
    timeline = plot_json(page, "timeline")
    assert {t["name"] for t in timeline["data"]} == {"finished", "stopped early"}


def test_report_of_twelve_trials_over_three_keys_with_stops_and_an_error(tmp_path):
    params = three_key_params(12)
    exp_dir = synthetic_experiment(tmp_path, "twelve", THREE, params, stop_at={1: 1, 4: 1, 6: 1, 9: 1},
                                   errors={10: ERROR})
    paths = write_report(exp_dir)
    page = Path(paths["html"]).read_text()
    assert figure_divs(page) == ["metric_per_key", "curves", "parallel", "contour", "importance", "timeline"]
    per_key = plot_json(page, "metric_per_key")
    assert [per_key["layout"][f"xaxis{i}"]["type"] for i in ("", "2", "3")] == ["log", "linear", "category"]
    assert per_key["layout"]["annotations"][2]["text"] == "warmup_ratio", "the third key is plotted"
    contour = plot_json(page, "contour")
    assert sum(t["type"] == "contour" for t in contour["data"]) == 6, "3 keys: every ordered pair"
    curves = plot_json(page, "curves")
    stops = [t for t in curves["data"] if t["legendgroup"] == "stopped early"]
    assert len(stops) == 4 and all(t["marker"]["symbol"][-1] == "x" for t in stops)
    assert [s["x0"] for s in curves["layout"]["shapes"]] == [1.0, 2.0], "ASHA's rungs (grace 1, rf 2, 3 epochs)"
    timeline = plot_json(page, "timeline")
    assert {t["name"] for t in timeline["data"]} == {"finished", "stopped early", "error"}
    # the error: its first lines and the exception, in the HTML and the Markdown
    assert "RuntimeError: CUDA out of memory: tried to allocate 2.00 GiB" in page
    assert "Traceback (most recent call last):" in page and "Failure # 1" not in page
    md = Path(paths["md"]).read_text()
    assert "RuntimeError: CUDA out of memory" in md and "| train.lr | " in md
    # each trial links to its own directory, relative to the report
    links = re.findall(r'<a href="(run_trial_[^"]+/)">(f00d\d_\d{5})</a>', page)
    assert len(links) == 12 and all((exp_dir / href).is_dir() and tid in href for href, tid in links)
    # the best box: serve, pipeline() and retrain commands
    assert f"distilray serve --experiment {exp_dir}" in page
    assert f'pipeline(&quot;text-classification&quot;, model=&quot;{exp_dir / "best"}&quot;)' in page
    assert f"distilray train --config {exp_dir / 'config.yaml'} --set train.lr=" in page


def add_confirmation(exp_dir: Path, seeds: dict[str, list[float]], base_seed: int = 42) -> None:
    """A confirm/ experiment: for each source trial, one run per extra seed with the given values."""
    confirm = exp_dir / "confirm"
    confirm.mkdir()
    summary = load_experiment_summary(exp_dir)
    by_id = {t.trial_id: t for t in summary.trials}
    for rank, (source, values) in enumerate(seeds.items(), start=1):
        for j, value in enumerate(values):
            tid = f"c0ffe_{rank * 10 + j:05d}"
            spec = {"rank": rank, "source": source, "base_seed": base_seed,
                    "params": {**by_id[source].params, "train.seed": base_seed + j + 1}}
            d = confirm / f"run_trial_{tid}_{j}"
            d.mkdir()
            (d / "params.json").write_text(json.dumps({"confirm": spec}))
            rows = rows_for(tid, [value - 0.05, value - 0.01, value], total_steps=30)
            (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seed_section_says_whether_the_lead_exceeds_the_spread(tmp_path):
    params = lr_wd_params(6)
    exp_dir = synthetic_experiment(tmp_path, "seeds", LR_WD, params,
                                   extra=("tune.confirm_top_k=2", "tune.confirm_seeds=2"))
    exp = load_experiment_summary(exp_dir)
    top = sorted_ids(exp)[:2]
    first, second = (next(t for t in exp.trials if t.trial_id == i).best_value for i in top)
    add_confirmation(exp_dir, {top[0]: [first - 0.001, first + 0.001], top[1]: [second, second + 0.002]})
    page = Path(write_report(exp_dir)["html"]).read_text()
    exp = load_experiment_summary(exp_dir)
    assert [len(c.values) for c in exp.confirm] == [3, 3] and [len(c.runs) for c in exp.confirm] == [2, 2]
    assert exp.confirm[0].mean == pytest.approx(first) and exp.confirm[0].spread == pytest.approx(0.001)
    lead = first - statistics.fmean([second, second, second + 0.002])
    verdict = "is larger than the seed spread" if lead > 0.001155 else "is NOT larger than the seed spread"
    assert verdict in page and "Seed confirmation: 4 of 4 extra runs (12.0 trial-epochs)" in page
    assert "seeds" in figure_divs(page)
    # noisy seeds: the lead drowns
    shutil.rmtree(exp_dir / "confirm")
    add_confirmation(exp_dir, {top[0]: [first - 0.1, first + 0.05], top[1]: [second - 0.05, second + 0.08]})
    page = Path(write_report(exp_dir)["html"]).read_text()
    assert "is NOT larger than the seed spread" in page and "cannot be told apart" in page


def sorted_ids(exp) -> list[str]:
    return [t.trial_id for t in sorted(exp.trials, key=lambda t: -(t.best_value or 0))]


# --------------------------------------------------------------------------- headless Chromium


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return exe


class Page:
    """One headless-Chromium tab over the DevTools protocol, offline, logging every request."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             # nothing can leave: no proxy reachable, no name resolves, and the tab is offline
             "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--hide-scrollbars", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert time.time() < deadline and self.proc.poll() is None, "Chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self._conn = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ws = self._conn.__enter__()
        self.next_id, self.events = 0, []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self._conn.__exit__(None, None, None)
        self.proc.terminate()
        self.proc.wait(timeout=30)


def check_in_browser(html_path: Path, screenshot: Path, n_trials: int, hover_keys: tuple[str, ...]) -> None:
    """Open report.html offline: every figure draws an SVG, hovering a point shows its values,
    no request leaves the machine; save a full-page screenshot."""
    pytest.importorskip("websockets")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))  # fresh: no stale DevToolsActivePort
    page = Page(profile)
    try:
        page.send("Network.enable")
        page.send("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1,
                  uploadThroughput=-1)
        page.send("Page.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                  mobile=False)
        page.send("Page.navigate", url=html_path.as_uri())
        rendered = page.wait_for("(function(){var a=document.body&&document.body.getAttribute("
                                 "'data-plots-rendered');return a&&a.split('/')[0]===a.split('/')[1]&&a;})()")
        n_figs = int(rendered.split("/")[0])
        assert n_figs >= 2 and n_figs == page.eval("document.querySelectorAll('div.plotly-graph-div').length")
        assert page.eval("document.querySelectorAll('#trials tr[data-trial]').length") == n_trials
        # hover the first finished trial's point in the metric-per-key figure
        page.eval("document.getElementById('plot-metric_per_key').scrollIntoView()")
        time.sleep(0.3)
        box = page.eval("(function(){var p=document.querySelector('#plot-metric_per_key .scatterlayer "
                        ".trace .points path');var r=p.getBoundingClientRect();"
                        "return [r.x+r.width/2, r.y+r.height/2];})()")
        page.send("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
        hover = page.wait_for("(function(){var h=document.querySelector('#plot-metric_per_key .hoverlayer');"
                              "return h&&h.textContent.indexOf('=')>=0&&h.textContent;})()")
        assert "trial " in hover and all(f"{k} = " in hover for k in hover_keys), hover
        page.eval("window.scrollTo(0, 0)")
        height = page.eval("document.documentElement.scrollHeight")
        shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        assert screenshot.stat().st_size > 50_000
        urls = [e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(("file:", "data:", "about:")) for u in urls), urls
    finally:
        page.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.browser
def test_report_renders_offline_in_headless_chromium(tmp_path):
    params = three_key_params(12)
    exp_dir = synthetic_experiment(tmp_path, "browser", THREE, params, stop_at={1: 1, 4: 1, 6: 1, 9: 1},
                                   errors={10: ERROR})
    paths = write_report(exp_dir)
    shot = tmp_path / "report.png"
    check_in_browser(Path(paths["html"]), shot, n_trials=12,
                     hover_keys=("train.lr", "train.weight_decay", "train.warmup_ratio"))
    artifacts = os.environ.get("DISTILRAY_TEST_ARTIFACTS")
    if artifacts:  # CI keeps the screenshot
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "tune-report.png")
