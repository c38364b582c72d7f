"""`distilray tune` on a real local Ray cluster: search quality, ASHA, resume, best/ export, report.

Every trial is a `distilray train` run of the random-init `tiny` model on 1k SST-2 sentences
(62 steps per epoch), one worker per trial, two trials at a time — the 4-CPU fixture holds
2 × (1 worker + 0.25 driver) and leaves room for Ray Data's tokenising tasks.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.util.placement_group import PlacementGroup, placement_group_table

from distilray.config import load_config
from distilray.errors import ClusterError
from distilray.metrics import REPORTED_METRICS
from distilray.train.run import read_metrics
from distilray.tune.experiment import EVENTS_FILE
from distilray.tune.search import FREE_AFTER_S, run_placement_groups, run_tune
from distilray.tune.summary import load_experiment_summary

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("report_checks", REPO / "tests" / "unit" / "test_report.py")
report_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_checks)


def tune_cfg(tmp_path, sst2_dir, name, *extra):
    return load_config(REPO / "tune" / "tiny-grid.yaml", [
        f"data.dataset={sst2_dir}", f"tune.storage_path={tmp_path}", f"tune.name={name}",
        "train.log_every_steps=100", "train.max_failures=0", *extra])


def result_rows(trial_dir: Path) -> list[dict]:
    """Tune's result.json of a trial: one JSON line per report (a line being written is skipped)."""
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


@pytest.mark.slow
@pytest.mark.browser
def test_search_with_bad_values_picks_a_sensible_config_and_asha_stops_weak_trials(
        ray_4_cpus, sst2_dir, tmp_path, caplog):
    # tune/tiny-grid.yaml: 3 lr × 2 wd, where lr 1e-7 cannot move a random model in 312 steps
    # and lr 0.5 diverges, so at least 4 of the 6 trials are clearly bad (they predict the
    # majority class: 0.509); ASHA (rungs at epoch 1 and 2) cuts them at epoch 1 once a
    # sensible trial has set the bar there.
    cfg = tune_cfg(tmp_path, sst2_dir, "acc")
    assert (cfg.tune.scheduler, cfg.train.epochs, cfg.tune.grace_period) == ("asha", 2, 1)
    caplog.set_level(logging.INFO, logger="distilray.tune.search")
    summary = run_tune(cfg)
    ended = time.time()
    exp_dir = tmp_path / "acc"
    exp = load_experiment_summary(exp_dir)
    assert len(exp.trials) == 6 and summary["errors"] == 0
    # the search ends once the stopped runs' placement groups are gone, not FREE_AFTER_S
    # (10 s) after its last trial: what is left is best/ and the report (~2 s)
    last_event = max(json.loads(line)["time"] for line in (exp_dir / EVENTS_FILE).read_text().splitlines())
    assert ended - last_event < FREE_AFTER_S - 2, ended - last_event

    # 1. the best trial is a sensible one, and clearly better than the worst
    best = json.loads((exp_dir / "best.json").read_text())
    assert best["params"]["train.lr"] == 1e-3, best["params"]
    values = sorted(t.best_value for t in exp.trials)
    assert best["metrics"]["eval_accuracy"] == values[-1] >= values[0] + 0.05, values
    assert best["metrics"]["eval_accuracy"] >= 0.6
    assert best["config"]["train"]["lr"] == 1e-3 and set(REPORTED_METRICS) <= set(best["metrics"])
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(exp_dir / "best"))
    assert {o["label"] for o in clf(["a gorgeous, witty film", "a dull, lifeless mess"])} <= {"negative", "positive"}
    assert not (exp_dir / "best" / "training_state.pt").exists()

    # 2. ASHA stopped weak trials: fewer trial-epochs than num_trials × max_t
    epochs = [t.epochs_run for t in exp.trials]
    assert sum(epochs) < 6 * 2, epochs
    stopped = [t for t in exp.trials if t.stopped_early]
    assert stopped and all(t.params["train.lr"] != 1e-3 or t.params["train.weight_decay"] == 1.0 for t in stopped)
    for trial_dir in exp_dir.glob("run_trial_*"):
        for row in result_rows(trial_dir):
            assert set(REPORTED_METRICS) <= set(row), "every report carries every training metric"
    # killed trials' Train runs hold no CPUs afterwards: every worker placement group is gone
    groups = set().union(*(run_placement_groups(d) for d in (exp_dir / "runs").iterdir()))
    assert len(groups) == 6
    assert {placement_group_table(PlacementGroup(ray_4_cpus.PlacementGroupID(bytes.fromhex(g))))["state"]
            for g in groups} == {"REMOVED"}

    # progress: one line per state change, with the current best
    lines = [r.getMessage() for r in caplog.records if r.name == "distilray.tune.search"]
    assert sum(" running (lr=" in ln for ln in lines) == 6
    assert sum(" stopped early (ASHA) at epoch 1.00" in ln for ln in lines) == len(stopped)
    assert sum(" done at epoch 2.00" in ln for ln in lines) == 6 - len(stopped)
    assert all("| [" in ln and "best:" in ln for ln in lines if " running (" in ln or " done " in ln)

    # 4. report files list every trial; the HTML renders in headless Chromium
    csv_rows = (exp_dir / "trials.csv").read_text().splitlines()
    assert len(csv_rows) == 7
    md = (exp_dir / "report.md").read_text()
    assert all(f"| {t.trial_id} |" in md for t in exp.trials)
    assert f"distilray serve --experiment {exp_dir}" in md
    out = subprocess.run([sys.executable, "-m", "distilray", "report", str(exp_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "report.html" in out.stdout
    report_checks.check_in_browser(exp_dir / "report.html", tmp_path / "report.png", n_trials=6,
                                   hover_keys=("train.lr", "train.weight_decay"))


@pytest.mark.slow
def test_killed_driver_resumes_and_keeps_finished_trials(ray_4_cpus, sst2_dir, tmp_path):
    # 2 trials one after the other (FIFO, 1 at a time), each a 2-worker Ray Train run (global
    # batch 32: 31 steps per epoch, evaluated every 16 steps); the driver is killed once the
    # first trial has finished and the second has reported, then `--resume` finishes the second.
    cfg_text = "\n".join([
        "# distilray tune --config search.yaml",
        "model: {name: tiny, dropout: 0.0}",
        f"data: {{dataset: '{sst2_dir}', max_length: 64, max_train_samples: 1000}}",
        "train: {lr: 2.0e-3, epochs: 2, batch_size: 16, num_workers: 2, eval_every_steps: 16,"
        " log_every_steps: 1, max_failures: 0}",
        "tune:",
        "  space:",
        "    train.lr: {type: grid, values: [2.0e-3, 3.0e-3]}",
        "    train.weight_decay: {type: grid, values: [0.0]}",
        "  search_alg: grid",
        "  num_samples: 1",
        "  scheduler: fifo",
        "  max_concurrent_trials: 1",
        f"  storage_path: '{tmp_path}'",
        "  name: resume", ""])
    (tmp_path / "search.yaml").write_text(cfg_text)
    env = {**os.environ, "RAY_ADDRESS": ray_4_cpus.get_runtime_context().gcs_address}
    exp_dir = tmp_path / "resume"
    # Tune copies a trial's result.json (the kill point below) to the storage path when it
    # saves the experiment's state: at least 10 s apart by default, about as long as the
    # second trial takes after its first report. Every second gives the kill point time.
    driver = subprocess.Popen([sys.executable, "-m", "distilray", "tune", "--config", str(tmp_path / "search.yaml")],
                              env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 420
    try:
        while time.time() < deadline:
            states = [json.loads(ln) for ln in (exp_dir / "events.jsonl").read_text().splitlines()] \
                if (exp_dir / "events.jsonl").exists() else []
            done = [s["trial_id"] for s in states if s["state"] == "done"]
            running = [s["trial_id"] for s in states if s["state"] == "running" and s["trial_id"] not in done]
            # A report reaches Tune after Ray Train has committed its checkpoint.
            reported = [r for d in exp_dir.glob(f"run_trial_{running[0]}_*") for r in result_rows(d)] \
                if done and running else []
            if reported:
                break
            assert driver.poll() is None, "driver exited before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("the search never reached the kill point")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    (finished,), (interrupted,) = done, running
    finished_dir = next(exp_dir.glob(f"run_trial_{finished}_*"))
    finished_rows = result_rows(finished_dir)
    time.sleep(3)  # let Ray notice the dead driver and tear its trial actors down
    rerun = subprocess.run([sys.executable, "-m", "distilray", "tune", "--resume", "resume",
                            "--storage-path", str(tmp_path)], env=env, capture_output=True, text=True,
                           timeout=420)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert result_rows(finished_dir) == finished_rows, "the finished trial was not run again"
    assert [r["event"] for r in read_metrics(exp_dir / "runs" / finished)].count("start") == 1
    resumed = read_metrics(exp_dir / "runs" / interrupted)
    restored = [r for r in resumed if r["event"] == "restored"]
    assert len(restored) == 1 and restored[0]["step"] >= 16, "Ray Train restored the trial's checkpoint"
    assert [r["step"] for r in resumed if r["event"] == "eval"][-1] == 62
    assert {w["rank"] for w in resumed if w["event"] == "worker"} == {0, 1}
    exp = load_experiment_summary(exp_dir)
    assert sorted(t.status for t in exp.trials) == ["done", "done"]
    assert (exp_dir / "best" / "model.safetensors").exists() and (exp_dir / "report.html").exists()
    assert "serve it: distilray serve --experiment" in rerun.stdout


def test_bad_resources_fail_before_any_trial_starts(ray_4_cpus, sst2_dir, tmp_path):
    cases = [
        (["train.cpus_per_worker=8"], r"a trial worker needs 8 CPU \(train.cpus_per_worker\) but no node has "
                                      r"that much \(largest: 4 CPU, 0 GPU\)"),
        (["train.use_gpu=true"], r"a trial worker needs 1 CPU \+ 1 GPU .* no node has that much"),
        (["tune.space={train.lr: {type: choice, values: [1.0e-3]}, train.num_workers: {type: choice, "
          "values: [1, 4]}}", "tune.search_alg=random"],
         r"one trial needs 4.25 CPUs \(tune.driver_cpus=0.25 \+ 4 workers × 1\) \+ 1 for Ray Data's "
         r"tokenising tasks but the cluster has 4"),
    ]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises(ClusterError, match=message):
            run_tune(tune_cfg(tmp_path, sst2_dir, f"bad{i}", *extra))
        exp_dir = tmp_path / f"bad{i}"
        assert not list(exp_dir.glob("run_trial_*")) and not (exp_dir / "config.yaml").exists()


@pytest.mark.slow
def test_optuna_search_then_seed_confirmation_of_the_top_two(ray_4_cpus, sst2_dir, tmp_path):
    # 2 Optuna trials, then tune.confirm_top_k=2 × tune.confirm_seeds=2: 4 more runs of the same
    # trainable in confirm/, each a top configuration with train.seed 43 or 44 (the search ran 42).
    # Half a CPU per worker lets all 4 runs go at once (4 × 0.75 + 1 for Ray Data = 4 CPUs):
    # one wave of Train start-ups instead of two (what these 20-step runs spend most time on).
    cfg = tune_cfg(tmp_path, sst2_dir, "optuna", "tune.search_alg=optuna", "tune.scheduler=asha",
                   "tune.num_samples=2", "tune.seed=0", "train.epochs=1", "data.max_train_samples=320",
                   "train.cpus_per_worker=0.5", "tune.max_concurrent_trials=4",
                   "tune.space={train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}, "
                   "train.weight_decay: {type: choice, values: [0.0, 0.1]}}",
                   "tune.confirm_top_k=2", "tune.confirm_seeds=2")
    started = time.time()
    summary = run_tune(cfg)
    elapsed = time.time() - started
    exp_dir = tmp_path / "optuna"
    exp = load_experiment_summary(exp_dir)
    assert summary["errors"] == 0 and [t.status for t in exp.trials] == ["done", "done"]
    assert all(1e-3 <= t.params["train.lr"] <= 1e-2 and t.params["train.weight_decay"] in (0.0, 0.1)
               for t in exp.trials)
    assert len({t.params["train.lr"] for t in exp.trials}) == 2
    assert (exp_dir / "best" / "model.safetensors").exists()

    # the seed section: 2 configurations × (the search's run + 2 seeds), 4 extra runs in all
    assert summary["confirm"] == {"runs": 4, "errors": 0}, summary["confirm"]
    assert [c.source for c in exp.confirm] == [t.trial_id for t in sorted(exp.trials, key=lambda t: -t.best_value)]
    for c in exp.confirm:
        source = next(t for t in exp.trials if t.trial_id == c.source)
        assert c.seeds == [42, 43, 44] and len(c.values) == 3 and c.values[0] == source.best_value
        assert [r.status for r in c.runs] == ["done", "done"]
        assert {k: v for k, v in c.runs[0].params.items() if k != "train.seed"} == source.params
    runs = sorted(p.name for p in (exp_dir / "confirm" / "runs").iterdir())
    assert len(runs) == 4 and not set(runs) & {p.name for p in (exp_dir / "runs").iterdir()}
    import yaml

    seeds = sorted(yaml.safe_load(p.read_text())["train"]["seed"]
                   for p in (exp_dir / "confirm" / "runs").glob("*/config.yaml"))
    assert seeds == [43, 43, 44, 44], "each run trained with its own seed"
    page = (exp_dir / "report.html").read_text()
    assert "Seed confirmation: 4 of 4 extra runs" in page and 'id="seed-table"' in page
    assert ("is larger than the seed spread" in page) != ("is NOT larger than the seed spread" in page)
    print(f"optuna search (2 trials) + seed confirmation (4 runs): {elapsed:.0f} s")
