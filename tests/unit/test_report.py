"""`distilray report` from files alone: trial summaries, CSV/Markdown/HTML, SVG plots, a real browser."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from distilray.config import dump_config, load_config
from distilray.tune.plots import Scale
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
    for name in ("space", "curves", "metric_vs_lr"):
        assert f"](plots/{name}.svg)" in md
        ET.fromstring((exp_dir / "plots" / f"{name}.svg").read_text())  # well-formed SVG
    page = Path(paths["html"]).read_text()
    assert page.count('<img class="plot"') == 3 and page.count("data:image/svg+xml;base64,") == 3
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert page.count("<tr class=") == 4


def test_report_of_a_directory_that_is_not_an_experiment(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distilray", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "is not a distilray tune experiment (no config.yaml)" in out.stderr


def test_log_and_linear_scales_map_and_tick():
    s = Scale([1e-7, 0.5], 0, 100, log=True, pad=0.0)
    assert s(1e-7) == pytest.approx(0) and s(0.5) == pytest.approx(100)
    assert [label for _, label in s.ticks()] == ["1e-7", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    lin = Scale([0.0, 1.0], 100, 0, pad=0.0)
    assert lin(0.25) == pytest.approx(75)
    assert [label for _, label in lin.ticks()] == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    one = Scale([0.5, 0.5], 0, 10)
    assert 0 < one(0.5) < 10, "a single value sits inside the axis"


# --------------------------------------------------------------------------- headless Chromium


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into rows of raw pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride, rows, prev = width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return exe


def check_in_browser(html_path: Path, screenshot: Path, n_trials: int, n_plots: int = 3) -> None:
    """Render report.html in headless Chromium: the DOM has the table and decoded plots, the pixels are a page."""
    exe = chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--allow-file-access-from-files", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", html_path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert f'data-plots-rendered="{n_plots}/{n_plots}"' in dom, dom[-3000:]
    assert dom.count("<tr class=") == n_trials and '<table id="trials">' in dom
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1200,2600", html_path.as_uri()],
                   capture_output=True, timeout=120)
    width, bpp, rows = png_pixels(screenshot.read_bytes())
    pixels = [row[i:i + 3] for row in rows[::4] for i in range(0, width * bpp, 4 * bpp)]
    colours = set(pixels)
    non_white = sum(p != b"\xff\xff\xff" for p in pixels) / len(pixels)
    assert len(colours) > 50 and non_white > 0.05, (len(colours), non_white)
    # plot colours (the red→green scale and the curve palette) are on screen, not just text
    assert any(p[1] > p[0] + 60 and p[1] > p[2] + 30 for p in colours), "no green plot pixels"


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    exp_dir = make_experiment(tmp_path)
    paths = write_report(exp_dir)
    check_in_browser(Path(paths["html"]), tmp_path / "report.png", n_trials=4)
