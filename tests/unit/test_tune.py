"""Tune logic without a cluster: presets, search-space checks, trial configs, best-checkpoint export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distilray.config import apply_overrides, load_config
from distilray.errors import ConfigError
from distilray.metrics import REPORTED_METRICS
from distilray.tune.experiment import (
    BEST_DIR,
    BEST_FILE,
    absolutize_paths,
    export_best,
    select_best,
    trial_config,
)
from distilray.tune.space import (
    METRIC_MODES,
    asha_rungs,
    check_tune_config,
    count_trials,
    max_epochs,
)

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "tune").glob("*.yaml"))


def with_space(space: dict, *extra: str):
    cfg = load_config(None, ["model.name=tiny", *extra])
    return apply_overrides(cfg, {"tune.space": space})


def problems_of(cfg) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_tune_config(cfg)
    return info.value.problems


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"tiny-grid.yaml", "sst2-minilm.yaml", "sst2-optuna.yaml", "imdb-distilbert.yaml"} <= names
    for name in ("tiny-grid.yaml", "sst2-minilm.yaml", "imdb-distilbert.yaml"):
        assert {"train.lr", "train.weight_decay"} <= set(load_config(REPO / "tune" / name).tune.space)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_opens_with_its_command_loads_and_passes_checks(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# distilray tune --config tune/" + path.name), first
    cfg = load_config(path)
    check_tune_config(cfg)
    assert count_trials(cfg) >= 1 and cfg.tune.space


def test_tuned_metrics_are_reported_by_training():
    assert set(METRIC_MODES) <= set(REPORTED_METRICS)


@pytest.mark.parametrize("spec, message", [
    ({"type": "loguniform", "low": 1e-4, "high": 1e-5}, r"inverted range low=0.0001 > high=1e-05; swap them"),
    ({"type": "uniform", "low": 0.1, "high": 0.1}, r"empty range low = high = 0.1"),
    ({"type": "choice", "values": []}, r"choice needs a non-empty list of values"),
    ({"type": "grid", "values": []}, r"grid needs a non-empty list of values"),
    ({"type": "normal", "mean": 1e-4}, r"unknown distribution type 'normal' \(choose one of: loguniform, "
                                       r"uniform, choice, grid\)"),
    ({"type": "loguniform", "low": 0.0, "high": 1e-4}, r"loguniform needs low > 0"),
    ({"type": "loguniform", "low": 1e-5}, r"type loguniform needs high"),
    ({"type": "uniform", "low": 1e-5, "high": 0.1, "step": 2}, r"unknown field\(s\) step"),
    ({"type": "loguniform", "low": 1e-5, "high": 2.0}, r"train.lr=2.0 is out of range"),
    ([1e-5, 1e-4], r"must be a mapping like"),
])
def test_bad_ranges_and_distributions_name_the_key_and_the_fix(spec, message):
    problems = problems_of(with_space({"train.lr": spec}))
    assert len(problems) == 1
    assert problems[0].startswith("tune.space.train.lr")
    assert __import__("re").search(message, problems[0]), problems[0]


def test_all_space_problems_are_reported_at_once():
    cfg = with_space({
        "train.lrr": {"type": "loguniform", "low": 1e-5, "high": 1e-4},
        "train.weight_decay": {"type": "uniform", "low": 0.1, "high": 0.0},
        "train.name": {"type": "choice", "values": ["a", "b"]},
        "serve.port": {"type": "choice", "values": [1, 2]},
    }, "tune.metric=accuracy")
    problems = problems_of(cfg)
    assert any("unknown key 'train.lrr' (did you mean 'train.lr'?)" in p for p in problems), problems
    assert any("inverted range" in p for p in problems)
    assert any("train.name is set by each trial" in p for p in problems)
    assert any("only keys of the sections model, data, train, distill" in p for p in problems)
    assert any(p.startswith("tune.metric='accuracy' is not a metric training reports; choose one of "
                            "eval_accuracy, eval_macro_f1, eval_loss") for p in problems)
    assert len(problems) == 5


def test_metric_mode_and_search_combinations_are_checked():
    assert problems_of(with_space({"train.lr": {"type": "choice", "values": [1e-5]}},
                                  "tune.metric=eval_loss", "tune.mode=max")) == [
        "tune.mode='max' would select the worst trial by eval_loss; set tune.mode=min"]
    (msg,) = problems_of(with_space({"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}},
                                    "tune.search_alg=grid"))
    assert "tune.search_alg=grid cannot sample continuous ranges (train.lr)" in msg
    (msg,) = problems_of(with_space({"train.lr": {"type": "grid", "values": [1e-5, 1e-4]}},
                                    "tune.search_alg=optuna"))
    assert "optuna does not take grid values (train.lr)" in msg
    (msg,) = problems_of(with_space({"train.lr": {"type": "choice", "values": [1e-5]}},
                                    "tune.grace_period=4", "train.epochs=2"))
    assert "tune.grace_period=4 epochs exceeds the 2 epochs" in msg
    (msg,) = problems_of(with_space({"train.lr": {"type": "choice", "values": [1e-5]}}, "tune.scheduler=pbt"))
    assert "tune.scheduler=pbt is not supported" in msg
    (msg,) = problems_of(with_space({"train.lr": {"type": "choice", "values": [1e-5]}},
                                    "tune.storage_path=s3://bucket/exps"))
    assert "experiments need a local directory or a shared mount" in msg


def test_bad_space_fails_on_the_command_line_before_anything_is_written(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "distilray", "tune", "--set", "model.name=tiny", "--set",
         "tune.space={train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-5}}",
         "--storage-path", str(tmp_path), "--name", "bad"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "distilray tune: error: tune.space.train.lr: inverted range low=0.001 > high=1e-05; swap them"]
    assert not any(tmp_path.iterdir()), "nothing is created for a search that cannot start"


def test_resume_of_an_unknown_experiment_says_where_it_looked(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distilray", "tune", "--resume", "nope",
                          "--storage-path", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"no experiment 'nope' under {tmp_path}" in out.stderr


def test_param_space_and_trial_counts():
    from ray.tune.search.sample import Categorical, Float, LogUniform

    from distilray.tune.search import build_param_space

    space = {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4},
             "train.weight_decay": {"type": "choice", "values": [0.0, 0.1]},
             "train.warmup_ratio": {"type": "grid", "values": [0.0, 0.1, 0.2]}}
    ps = build_param_space(space, "random")
    assert isinstance(ps["train.lr"], Float) and isinstance(ps["train.lr"].get_sampler(), LogUniform)
    assert (ps["train.lr"].lower, ps["train.lr"].upper) == (1e-5, 1e-4)
    assert isinstance(ps["train.weight_decay"], Categorical)
    assert ps["train.warmup_ratio"] == {"grid_search": [0.0, 0.1, 0.2]}
    cfg = with_space(space, "tune.num_samples=4")
    assert count_trials(cfg) == 12  # each grid point sampled 4 times
    grid = {"train.lr": {"type": "grid", "values": [1e-5, 1e-4]},
            "train.weight_decay": {"type": "choice", "values": [0.0, 0.01, 0.1]}}
    assert build_param_space(grid, "grid")["train.weight_decay"] == {"grid_search": [0.0, 0.01, 0.1]}
    assert count_trials(with_space(grid, "tune.search_alg=grid", "tune.num_samples=1")) == 6


def test_max_epochs_follows_train_epochs_or_the_space():
    assert max_epochs(with_space({}, "train.epochs=3")) == 3
    assert max_epochs(with_space({"train.epochs": {"type": "choice", "values": [1, 4]}})) == 4
    assert max_epochs(with_space({}, "tune.max_t=2.5")) == 2.5


def test_trial_config_sets_name_storage_and_checkpoint_ranking(tmp_path):
    base = with_space({}, "tune.metric=eval_loss", "tune.mode=min")
    cfg = trial_config(base, {"train.lr": 3e-4, "train.weight_decay": 0.1}, str(tmp_path), "abc12_00003")
    assert (cfg.train.lr, cfg.train.weight_decay) == (3e-4, 0.1)
    assert cfg.train.name == "abc12_00003" and cfg.train.storage_path == f"{tmp_path}/runs"
    assert (cfg.train.checkpoint_score_attribute, cfg.train.checkpoint_score_order) == ("eval_loss", "min")


def test_relative_paths_become_absolute_for_trials_that_run_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = absolutize_paths(load_config(None, ["data.dataset=data", "model.name=tiny",
                                              "tune.storage_path=exps"]))
    assert cfg.data.dataset == str(tmp_path / "data")
    assert cfg.model.name == "tiny" and cfg.tune.storage_path == str(tmp_path / "exps")
    assert absolutize_paths(load_config(None, ["data.dataset=glue/sst2"])).data.dataset == "glue/sst2"


def fake_checkpoint(exp: Path, trial: str, step: int, acc: float) -> Path:
    ckpt = exp / "runs" / trial / f"checkpoint-step{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_text(f"weights {trial} {step}")
    (ckpt / "training_state.pt").write_text("optimizer")
    (ckpt / "distilray.json").write_text(json.dumps({"step": step, "metrics": {"eval_accuracy": acc,
                                                                               "eval_loss": 1 - acc}}))
    return ckpt


def test_select_best_by_metric_and_mode():
    ckpts = [{"trial_id": "a", "metrics": {"eval_accuracy": 0.7, "eval_loss": 0.5}},
             {"trial_id": "b", "metrics": {"eval_accuracy": 0.8, "eval_loss": 0.6}},
             {"trial_id": "c", "metrics": {"eval_accuracy": float("nan"), "eval_loss": 0.1}},
             {"trial_id": "d", "metrics": {"eval_accuracy": 0.8, "eval_loss": 0.7}}]
    assert select_best(ckpts, "eval_accuracy", "max")["trial_id"] == "b"  # tie: the first wins
    assert select_best(ckpts, "eval_loss", "min")["trial_id"] == "c"
    assert select_best([], "eval_accuracy", "max") is None


def test_export_best_copies_the_best_checkpoint_without_optimizer_state(tmp_path):
    fake_checkpoint(tmp_path, "t_00000", 10, 0.6)
    best_ckpt = fake_checkpoint(tmp_path, "t_00001", 20, 0.9)
    fake_checkpoint(tmp_path, "t_00001", 30, 0.85)
    trial_dir = tmp_path / "run_trial_t_00001_1_lr=0.001"
    trial_dir.mkdir()
    (trial_dir / "params.json").write_text(json.dumps({"train.lr": 1e-3}))
    (tmp_path / BEST_DIR).mkdir()
    (tmp_path / BEST_DIR / "stale.txt").write_text("from an earlier export")
    info = export_best(tmp_path, "eval_accuracy", "max")
    assert info["trial_id"] == "t_00001" and info["step"] == 20 and info["params"] == {"train.lr": 1e-3}
    best = tmp_path / BEST_DIR
    assert sorted(p.name for p in best.iterdir()) == ["best.json", "config.json", "distilray.json",
                                                      "model.safetensors"]
    assert (best / "model.safetensors").read_text() == "weights t_00001 20"
    assert json.loads((tmp_path / BEST_FILE).read_text()) == json.loads((best / BEST_FILE).read_text())
    assert json.loads((tmp_path / BEST_FILE).read_text())["checkpoint"] == str(best_ckpt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary leftovers"
    assert export_best(tmp_path / "nothing", "eval_accuracy", "max") is None


def test_optuna_search_alg_is_optunas_tpe():
    from ray.tune.search.optuna import OptunaSearch

    from distilray.tune.search import make_search_alg

    cfg = with_space({"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}}, "tune.search_alg=optuna")
    check_tune_config(cfg)
    assert isinstance(make_search_alg(cfg), OptunaSearch)


def test_run_placement_groups_come_from_the_workers_log(tmp_path):
    from distilray.tune.search import run_placement_groups

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "worker", "rank": 0, "placement_group": "aa01"},
        {"event": "worker", "rank": 1, "placement_group": "aa01"},
        {"event": "restored", "step": 3},
        {"event": "worker", "rank": 0, "placement_group": "bb02"},  # a restarted worker group
        {"event": "worker", "rank": 0, "placement_group": None}]))
    assert run_placement_groups(tmp_path) == {"aa01", "bb02"}
    assert run_placement_groups(tmp_path / "missing") == set()


# --------------------------------------------------------------------------- YAML 1.1 floats, --set of one entry


def load_yaml_space(tmp_path, body: str):
    (tmp_path / "s.yaml").write_text("model: {name: tiny}\ntune:\n  space:\n" + body)
    return load_config(tmp_path / "s.yaml")


@pytest.mark.parametrize("body, key, field, expected", [
    ("    train.lr: {type: loguniform, low: 1e-5, high: 1e-3}\n", "train.lr", "low", 1e-5),
    ("    train.lr: {type: loguniform, low: 1e-5, high: 1e-3}\n", "train.lr", "high", 1e-3),
    ("    train.lr: {type: uniform, low: '2E-5', high: 5.0e-5}\n", "train.lr", "low", 2e-5),
    ("    train.lr: {type: grid, values: [1e-3, 1e-4]}\n", "train.lr", "values", [1e-3, 1e-4]),
    ("    train.weight_decay: {type: choice, values: [0, 1e-2, .5e-1]}\n", "train.weight_decay", "values",
     [0.0, 1e-2, 0.05]),
    ("    train.epochs: {type: choice, values: ['2', 3]}\n", "train.epochs", "values", [2, 3]),
    ("    model.name: {type: choice, values: [tiny, '1e5']}\n", "model.name", "values", ["tiny", "1e5"]),
])
def test_yaml11_float_strings_in_the_space_become_numbers(tmp_path, body, key, field, expected):
    import yaml

    assert isinstance(yaml.safe_load("x: 1e-5")["x"], str), "PyYAML (YAML 1.1) reads 1e-5 as a string"
    cfg = load_yaml_space(tmp_path, body)
    value = cfg.tune.space[key][field]
    assert value == expected and [type(v) for v in np_list(value)] == [type(v) for v in np_list(expected)]
    if key != "model.name":
        check_tune_config(cfg)


def np_list(value):
    return value if isinstance(value, list) else [value]


def test_set_edits_one_field_of_one_space_entry():
    preset = REPO / "tune" / "sst2-minilm.yaml"
    base = load_config(preset).tune.space
    cfg = load_config(preset, ["tune.space.train.lr.high=1e-3"])
    assert cfg.tune.space["train.lr"] == {**base["train.lr"], "high": 1e-3}
    assert cfg.tune.space["train.weight_decay"] == base["train.weight_decay"], "other entries kept"
    # a whole entry, in YAML flow or JSON (quoted 1e-5 is coerced too); null removes one
    cfg = load_config(preset, ['tune.space.train.lr={"type": "loguniform", "low": "1e-5", "high": 2e-4}',
                               "tune.space.train.warmup_ratio={type: choice, values: [0, 0.1]}",
                               "tune.space.train.weight_decay=null"])
    assert cfg.tune.space == {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 2e-4},
                              "train.warmup_ratio": {"type": "choice", "values": [0.0, 0.1]}}
    # edits apply on top of a whole space given earlier on the same line, and of the default space
    cfg = load_config(None, ["tune.space={train.lr: {type: loguniform, low: 1e-5, high: 1e-4}}",
                             "tune.space.train.lr.low=2e-5"])
    assert cfg.tune.space == {"train.lr": {"type": "loguniform", "low": 2e-5, "high": 1e-4}}
    cfg = load_config(None, ["tune.space.train.weight_decay.values=[0.0, 0.3]"])
    assert cfg.tune.space["train.weight_decay"]["values"] == [0.0, 0.3] and "train.lr" in cfg.tune.space
    # the same path works for apply_overrides (what trials and tests use)
    assert apply_overrides(cfg, {"tune.space.train.lr.high": 3e-4}).tune.space["train.lr"]["high"] == 3e-4


def test_bad_space_overrides_name_the_override_and_the_form():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["tune.space.lr.high=1e-3", "tune.space.train.lr.hi=2", "tune.space.train.lr.low.x=1"])
    problems = info.value.problems
    assert len(problems) == 3
    assert "override 'tune.space.lr.high=1e-3': a space entry is tune.space.<section>.<key>[.<field>]" in problems[0]
    assert "unknown field 'hi' of a space entry (allowed: type, low, high, values)" in problems[1]
    assert "tune.space.<section>.<key>[.<field>]" in problems[2]
    with pytest.raises(ConfigError, match=r"tune.space.train.warmup_ratio.high: train.warmup_ratio is not in "
                                          r"tune.space \(searched: train.lr, train.weight_decay\); add it whole"):
        load_config(None, ["tune.space.train.warmup_ratio.high=0.2"])


# --------------------------------------------------------------------------- dry run, cluster fit, seeds


def offline_overrides(path: Path, sst2_dir: Path, imdb_dir: Path, teacher: Path) -> list[str]:
    """What a preset needs on a machine without the Hugging Face Hub: local data, a local teacher."""
    cfg = load_config(path)
    extra = [f"data.dataset={imdb_dir if cfg.data.dataset == 'imdb' else sst2_dir}"]
    if cfg.model.name == "distilbert-base-uncased":
        extra.append("model.name=tiny")  # the Hub model; its tokenizer and config need the Hub
    if cfg.distill.teacher:  # the tiny teacher has 2 layers, so a 1-layer student
        extra += [f"distill.teacher={teacher}", "distill.student=layers:1"]
    return [a for e in extra for a in ("--set", e)]


@pytest.mark.slow  # loads each preset's data: ~8 s on 2 cores
def test_dry_run_of_every_preset_prints_its_plan(tmp_path, sst2_dir, imdb_dir):
    import os
    import subprocess
    import sys

    from distilray.runtime import DATA_CPUS, local_cpus
    from tests.conftest import save_tiny_checkpoint

    # A fresh process per preset, as a user runs it: the dry run checks the cluster it would
    # use, and this test process may already hold the suite's session Ray.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    teacher = save_tiny_checkpoint(tmp_path / "teacher", "teacher")
    for path in PRESETS:
        proc = subprocess.run(
            [sys.executable, "-m", "distilray", "tune", "--config", str(path),
             *offline_overrides(path, sst2_dir, imdb_dir, teacher),
             "--storage-path", str(tmp_path / "exps"), "--name", path.stem, "--dry-run"],
            capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
        rc, out = proc.returncode, proc.stdout
        cfg = load_config(path)
        assert rc == 0, (path.name, out, proc.stderr[-2000:])
        assert f"dry run OK: experiment '{path.stem}', {count_trials(cfg)} trials" in out, out
        workers, cpus = cfg.train.num_workers, cfg.train.cpus_per_worker
        need = cfg.tune.driver_cpus + workers * cpus
        assert f"resources per trial: {workers} worker(s) × {cpus:g} CPU + {cfg.tune.driver_cpus:g} CPU driver " \
               f"= {need:g} CPUs" in out, out
        fits = int((local_cpus(need) - DATA_CPUS) // need)  # the private local Ray the run would start
        assert f"concurrency: {min(cfg.tune.max_concurrent_trials, fits)} at a time" in out, out
        assert "steps per trial: " in out and all(f"    {k}: " in out for k in cfg.tune.space)
        if cfg.tune.scheduler == "asha":
            assert "rungs (ASHA, epochs): " + ", ".join(f"{r:g}" for r in asha_rungs(cfg)) in out
        assert ("= 4 extra runs" in out) == (path.name == "tiny-seeds.yaml")
    assert not (tmp_path / "exps").exists() or not any((tmp_path / "exps").iterdir()), "a dry run writes nothing"
    rungs = asha_rungs(load_config(REPO / "tune" / "imdb-distilbert.yaml"))
    assert rungs == [1.0, 3.0], "grace 1, rf 3, 3 epochs: cuts after epoch 1"


def test_bad_preset_dry_run_exits_2_naming_every_problem(tmp_path, sst2_dir, capsys, monkeypatch):
    (tmp_path / "bad.yaml").write_text("\n".join([
        "# distilray tune --config bad.yaml --dry-run",
        "model: {name: tiny}",
        f"data: {{dataset: '{sst2_dir}', max_train_samples: 40, text_column: sentence}}",
        "train: {epochs: 1, cpus_per_worker: 64}",
        "tune:",
        "  space:",
        "    train.lr: {type: loguniform, low: 1e-3, high: 1e-5}",
        "    train.weight_decay: {type: normal, values: [0, 0.1]}",
        "  metric: accuracy",
        "  grace_period: 3",
        "  confirm_top_k: 2", ""]))
    from distilray.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["tune", "--config", str(tmp_path / "bad.yaml"), "--storage-path", str(tmp_path / "exps"),
               "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    (line,) = [ln for ln in err.strip().splitlines() if ln.startswith("distilray tune: error: ")]
    for problem in ["tune.space.train.lr: inverted range low=0.001 > high=1e-05; swap them",
                    "tune.space.train.weight_decay: unknown distribution type 'normal'",
                    "tune.metric='accuracy' is not a metric training reports",
                    "tune.grace_period=3 epochs exceeds the 1 epochs a trial runs",
                    "tune.confirm_top_k=2 and tune.confirm_seeds=0: set both"]:
        assert problem in line, (problem, line)
    assert not (tmp_path / "exps").exists()


def test_dry_run_names_a_cluster_misfit_with_the_data_problem(tmp_path, sst2_dir, monkeypatch):
    from distilray.tune.search import run_tune

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(REPO / "tune" / "tiny-grid.yaml", [
        f"data.dataset={tmp_path / 'missing'}", "train.use_gpu=true", f"tune.storage_path={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        run_tune(cfg, dry_run=True)
    text = str(info.value)
    assert "missing" in text and "a trial worker needs 1 CPU + 1 GPU" in text, text


def test_cluster_fit_counts_trials_per_cluster():
    from distilray.tune.search import cluster_fit

    cfg = load_config(REPO / "tune" / "imdb-distilbert.yaml")  # 2 workers × 4 CPUs + 0.25
    problems, fit = cluster_fit(cfg, [{"CPU": 16.0}, {"CPU": 16.0}])
    assert problems == [] and fit["trial_cpus"] == 8.25 and fit["fits"] == 3 and fit["cluster_cpus"] == 32
    problems, fit = cluster_fit(cfg, [{"CPU": 8.0}])
    assert fit["fits"] == 0 and len(problems) == 1 and problems[0].startswith("one trial needs 8.25 CPUs")
    gpu = apply_overrides(cfg, {"train.use_gpu": True})
    problems, fit = cluster_fit(gpu, [{"CPU": 32.0, "GPU": 6.0}, {"CPU": 4.0}])
    assert problems == [] and fit["fits"] == 3, "GPUs bound: 6 // 2; CPUs would allow (36 - 1) // 8.25 = 4"
    problems, _ = cluster_fit(gpu, [{"CPU": 32.0}])
    assert problems and "a trial worker needs 4 CPU + 1 GPU" in problems[0]


def test_confirmation_plan_takes_the_top_finished_trials_and_new_seeds():
    from distilray.tune.summary import TrialSummary, plan_confirmation

    trials = [TrialSummary("t0", {"train.lr": 1e-3}, "done", best_value=0.80),
              TrialSummary("t1", {"train.lr": 2e-3}, "stopped early", best_value=0.95),
              TrialSummary("t2", {"train.lr": 3e-3}, "done", best_value=0.85),
              TrialSummary("t3", {"train.lr": 4e-3}, "error"),
              TrialSummary("t4", {"train.lr": 5e-3}, "done", best_value=0.70)]
    plan = plan_confirmation(trials, "max", top_k=2, seeds=2, base_seed=42)
    assert [(p["rank"], p["source"], p["params"]["train.seed"]) for p in plan] == [
        (1, "t2", 43), (1, "t2", 44), (2, "t0", 43), (2, "t0", 44)], "a stopped trial's value is not final"
    assert plan[0]["params"] == {"train.lr": 3e-3, "train.seed": 43}
    assert [p["source"] for p in plan_confirmation(trials, "min", 1, 1, 0)] == ["t4"]


def test_confirm_settings_are_checked():
    cfg = with_space({"train.lr": {"type": "grid", "values": [1e-3, 2e-3]},
                      "train.seed": {"type": "choice", "values": [1, 2]}},
                     "tune.search_alg=grid", "tune.confirm_top_k=3", "tune.confirm_seeds=2")
    problems = problems_of(cfg)
    assert len(problems) == 1 and "train.seed cannot be searched as well" in problems[0], problems
    too_many = with_space({"train.lr": {"type": "grid", "values": [1e-3, 2e-3]}}, "tune.search_alg=grid",
                          "tune.num_samples=1", "tune.confirm_top_k=3", "tune.confirm_seeds=2")
    assert problems_of(too_many) == ["tune.confirm_top_k=3 exceeds the 2 trials the search runs; lower it"]
    assert load_config(None, ["model.name=tiny"]).tune.confirm_top_k == 0, "off by default"
    check_tune_config(load_config(REPO / "tune" / "tiny-seeds.yaml"))
