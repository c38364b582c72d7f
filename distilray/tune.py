"""`distilray tune`: search lr × weight decay (and more) with Ray Tune, every trial a `distilray train` run.

Follows Ray 2.60's documented way to tune a Train V2 `TorchTrainer`: a function trainable
(`run_trial`) is the driver of one Ray Train run — `train.prepare_run` + `train.fit`, the same
code as `distilray train` — and Train's reports reach Tune through `TuneReportCallback`. ASHA
(default) stops weak trials on the validation metric reported every epoch / K steps, with
`epoch` as its clock, so a trial that restarts after a crash keeps its place on the rungs.

Experiment layout (`<tune.storage_path>/<tune.name>/`):

    config.yaml     the resolved run config (what `--resume` and `distilray report` read)
    events.jsonl    one line per trial state change (running / stopped early / done / error)
    <trial dirs>/   Tune's per-trial params.json, result.json (every report)
    runs/<trial>/   the trial's Ray Train run: checkpoint-step*/ in Hugging Face format
    best/ best.json the best trial's best checkpoint and what it is
    report.html report.md trials.csv plots/   see `distilray.report`
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distilray.checkpoints import NOT_SERVED
from distilray.config import Config, apply_overrides, config_to_dict, dump_config, load_config
from distilray.errors import ClusterError, ConfigError, RunFailed
from distilray.files import replace_dir_atomic, write_json_atomic
from distilray.metrics import REPORTED_METRICS
from distilray.runtime import DATA_CPUS, connect_ray, is_uri, resolve_storage

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
EVENTS_FILE = "events.jsonl"
BEST_DIR = "best"
BEST_FILE = "best.json"
RUNS_DIR = "runs"
"""CPUs kept free for Ray Data's tokenising tasks (1 CPU each), which every trial's datasets need."""
FREE_AFTER_S = 10.0
"""Seconds between a trial being stopped and freeing what its killed Train run still holds."""
TIME_ATTR = "epoch"
"""ASHA's clock: the epoch (fractional between epochs) each report is made at."""

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


# --------------------------------------------------------------------------- checking (no Ray)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def space_problems(cfg: Config) -> list[str]:
    """Every problem of tune.space: unknown keys/distributions, empty or inverted ranges, bad values."""
    problems: list[str] = []
    space = cfg.tune.space
    if not space:
        return ["tune.space is empty; give at least one key, e.g. "
                "train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}"]
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if str(key) in SET_PER_TRIAL:
            problems.append(f"{where}: {key} is set by each trial and cannot be searched")
            continue
        if str(key).split(".")[0] not in TUNABLE_SECTIONS or "." not in str(key):
            problems.append(f"{where}: only keys of the sections {', '.join(TUNABLE_SECTIONS)} can be "
                            "searched, written section.key (e.g. train.lr)")
            continue
        if not isinstance(spec, Mapping):
            problems.append(f"{where} must be a mapping like {{type: loguniform, low: 1.0e-5, "
                            f"high: 1.0e-4}}, got {spec!r}")
            continue
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            problems.append(f"{where}: unknown distribution type {kind!r} "
                            f"(choose one of: {', '.join(DISTRIBUTIONS)})")
            continue
        fields = DISTRIBUTIONS[kind]
        extra = sorted(set(spec) - {"type", *fields})
        missing = [f for f in fields if f not in spec]
        if extra:
            problems.append(f"{where}: unknown field(s) {', '.join(extra)} for type {kind} "
                            f"(allowed: {', '.join(fields)})")
        if missing:
            problems.append(f"{where}: type {kind} needs {', '.join(missing)}")
            continue
        if kind in ("loguniform", "uniform"):
            low, high = spec["low"], spec["high"]
            if not (_is_number(low) and _is_number(high)):
                problems.append(f"{where}: low and high must be numbers, got low={low!r} high={high!r}")
                continue
            if low > high:
                problems.append(f"{where}: inverted range low={low!r} > high={high!r}; swap them")
                continue
            if low == high:
                problems.append(f"{where}: empty range low = high = {low!r}; widen it, or use "
                                f"{{type: choice, values: [{low!r}]}} for a constant")
                continue
            if kind == "loguniform" and low <= 0:
                problems.append(f"{where}: loguniform needs low > 0, got low={low!r}; "
                                "use uniform for ranges that include 0")
                continue
            samples = [low, high]
        else:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                problems.append(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
                continue
            samples = values
        for value in samples:
            try:
                apply_overrides(cfg, {key: value})
            except ConfigError as exc:
                problems.extend(f"{where}: {p}" for p in exc.problems)
                break
    return problems


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


def check_tune_config(cfg: Config) -> None:
    """Raise one ConfigError listing every problem of the tune section, before any Ray work."""
    problems = space_problems(cfg) + search_problems(cfg)
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


def absolutize_paths(cfg: Config, base: Path | None = None) -> Config:
    """Trials run with the trial directory as cwd, so local paths must not be relative."""
    base = base or Path.cwd()

    def fix(value: str | None) -> str | None:
        if not value or is_uri(value) or value.startswith(("offline:", "synthetic:")) or value == "tiny":
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        return str((base / path).resolve()) if (base / path).exists() else value

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=fix(cfg.model.name), cache_dir=fix(cfg.model.cache_dir)),
        data=dataclasses.replace(cfg.data, dataset=fix(cfg.data.dataset)),
        distill=dataclasses.replace(cfg.distill, teacher=fix(cfg.distill.teacher)),
        tune=dataclasses.replace(cfg.tune, storage_path=resolve_storage(cfg.tune.storage_path)))


def trial_config(base: Config, params: Mapping[str, Any], exp_dir: str, trial_id: str) -> Config:
    """A trial's full config: the base, the sampled values, and its place in the experiment."""
    return apply_overrides(base, {
        **params,
        "train.name": trial_id,
        "train.storage_path": f"{exp_dir}/{RUNS_DIR}",
        # Ray Train keeps the best checkpoints by the metric the search ranks trials by.
        "train.checkpoint_score_attribute": base.tune.metric,
        "train.checkpoint_score_order": base.tune.mode,
    })


def is_better(value: float, than: float | None, mode: str) -> bool:
    return than is None or (value > than if mode == "max" else value < than)


def format_params(params: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in params.items())


# --------------------------------------------------------------------------- Ray glue


def build_param_space(space: Mapping[str, Mapping[str, Any]], search_alg: str) -> dict[str, Any]:
    """tune.space → Ray Tune domains (grid search for `grid`, and for `choice` under search_alg grid)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif kind == "grid" or search_alg == "grid":
            out[key] = tune.grid_search(list(spec["values"]))
        else:
            out[key] = tune.choice(list(spec["values"]))
    return out


def make_scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    if tc.scheduler == "asha":
        # stop_last_trials=False: a trial reaching max_t ends by itself, so its Train run shuts
        # down cleanly instead of being killed after its last report.
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_epochs(cfg), grace_period=tc.grace_period,
                             reduction_factor=tc.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def make_search_alg(cfg: Config):
    tc = cfg.tune
    if tc.search_alg == "optuna":
        try:
            import optuna
        except ImportError:
            raise ConfigError("tune.search_alg=optuna needs Optuna: pip install 'distilray[optuna]'") from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed))
    from ray.tune.search import BasicVariantGenerator

    # The variant generator limits concurrency itself (TuneConfig's limit is for Searchers).
    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)


def run_trial(params: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """One Tune trial: the driver of one `distilray train` run with the trial's values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distilray.config import config_from_dict
    from distilray.distill.objective import objective_for
    from distilray.train.run import fit, prepare_run

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config_from_dict(base), params, exp_dir, trial_id)
    objective = objective_for(cfg)
    run = prepare_run(cfg, objective)
    plan = {"total_steps": run.plan.total_steps, "steps_per_epoch": run.plan.steps_per_epoch}

    class TrialReportCallback(TuneReportCallback):
        """Tune's documented Train→Tune callback, adding the step plan so reports say how far along they are."""

        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**m, **plan} for m in metrics], checkpoint)

    # a distillation search's teacher logits are cached under runs/: computed once per search
    fit(run, objective, callbacks=[TrialReportCallback()])


def run_placement_groups(run_dir: Path) -> set[str]:
    """Placement groups the workers of a Train run were placed in (from its metrics.jsonl)."""
    from distilray.train.run import read_metrics

    return {r["placement_group"] for r in read_metrics(run_dir)
            if r.get("event") == "worker" and r.get("placement_group")}


def free_placement_groups(ids: set[str]) -> int:
    """Remove the worker placement groups of Train runs whose trial was stopped (its actor killed).

    Ray Train's PlacementGroupCleaner does this too, but it finds the cluster through the State
    API's address lookup, which fails on a host running several Ray clusters, and the group
    would hold its CPUs until the driver exits: later trials would wait for them forever.
    """
    import ray
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    freed = 0
    for hex_id in sorted(ids):
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
        try:
            if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                remove_placement_group(group)
                freed += 1
        except Exception as exc:  # already gone, or the cluster is shutting down
            log.debug("placement group %s: %s", hex_id, exc)
    return freed


def _progress_callback(exp_dir: Path, metric: str, mode: str, total: int, scheduler: str):
    """A Tune callback printing one line per trial state change, with the current best."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.states: dict[str, str] = {}
            self.to_free: dict[str, float] = {}
            """trial id → when to free the placement groups of its killed Train run."""

        def _free_due(self, now: float) -> None:
            for trial_id, due in list(self.to_free.items()):
                if due <= now:
                    del self.to_free[trial_id]
                    freed = free_placement_groups(run_placement_groups(exp_dir / RUNS_DIR / trial_id))
                    if freed:
                        log.info("trial %s: freed %d placement group(s) of its stopped Train run",
                                 trial_id, freed)

        def on_step_begin(self, iteration, trials, **info):
            if self.to_free:
                self._free_due(time.time())

        def on_experiment_end(self, trials, **info):
            if self.to_free:  # the last stopped trials' actors may still be exiting
                time.sleep(max(0.0, max(self.to_free.values()) - time.time()))
                self._free_due(math.inf)

        def _best(self, trials) -> str:
            best, who = None, None
            for t in trials:
                value = t.metric_analysis.get(metric, {}).get(mode)
                if value is not None and is_better(value, best, mode):
                    best, who = value, t.trial_id
            done = sum(state != "running" for state in self.states.values())
            head = f"[{done}/{total} finished]"
            return f"{head} best: {who} {metric} {best:.4f}" if who else f"{head} best: none yet"

        def _emit(self, trials, trial, state: str, detail: str) -> None:
            if self.states.get(trial.trial_id) == state:
                return
            self.states[trial.trial_id] = state
            for t in trials:  # trials finished before a --resume
                if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.states:
                    self.states[t.trial_id] = "finished"
            last = trial.last_result or {}
            record = {"time": round(time.time(), 3), "trial_id": trial.trial_id, "state": state,
                      "params": {k: trial.config.get(k) for k in trial.config},
                      "epoch": last.get(TIME_ATTR), metric: last.get(metric)}
            with open(exp_dir / EVENTS_FILE, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
            log.info("trial %s %s%s | %s", trial.trial_id, state, detail, self._best(trials))

        def on_trial_start(self, iteration, trials, trial, **info):
            self._emit(trials, trial, "running", f" ({format_params(trial.config)})")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            epoch, value = last.get(TIME_ATTR), last.get(metric)
            total_steps, step = last.get("total_steps"), last.get("step")
            finished = total_steps is not None and step is not None and step >= total_steps
            tail = f" at epoch {epoch:.2f} ({metric} {value:.4f})" if value is not None else ""
            if finished:
                self._emit(trials, trial, "done", tail)
            else:
                self._emit(trials, trial, f"stopped early ({scheduler.upper()})", tail)
            # A trial stopped by the scheduler, even at its last report, had its actor killed
            # with the Train controller it owned; by FREE_AFTER_S both have exited.
            self.to_free[trial.trial_id] = time.time() + FREE_AFTER_S

        def on_trial_error(self, iteration, trials, trial, **info):
            self._emit(trials, trial, "error", f" (see {trial.path})")
            self.to_free[trial.trial_id] = time.time() + FREE_AFTER_S

    return Progress()


def preflight_cluster(cfg: Config) -> Config:
    """Refuse trials no node (or the whole cluster) can ever hold, before any trial starts.

    Returns cfg with tune.max_concurrent_trials lowered to what the cluster holds at once,
    keeping DATA_CPUS free: trials whose Ray Data tasks find no CPU would wait forever.
    """
    import ray

    from distilray.train.run import preflight

    tc, tn = cfg.train, cfg.tune
    workers = max([tc.num_workers, *space_extremes(cfg, "train.num_workers")])
    cpus = max([tc.cpus_per_worker, *space_extremes(cfg, "train.cpus_per_worker")])
    use_gpu = any([tc.use_gpu, *space_extremes(cfg, "train.use_gpu")])
    gpus = max([tc.gpus_per_worker, *space_extremes(cfg, "train.gpus_per_worker")]) if use_gpu else 0.0
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    biggest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if not any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        raise ClusterError(
            f"a trial worker needs {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") +
            f" (train.cpus_per_worker{', train.gpus_per_worker' if gpus else ''}) but no node has that "
            f"much (largest: {biggest_cpu:g} CPU, {biggest_gpu:g} GPU); lower it or add bigger nodes")
    if not any(n.get("CPU", 0.0) >= tn.driver_cpus for n in nodes):
        raise ClusterError(f"tune.driver_cpus={tn.driver_cpus:g} but no node has that many CPUs "
                           f"(largest: {biggest_cpu:g}); lower tune.driver_cpus")
    total = ray.cluster_resources()
    total_cpu, total_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need = tn.driver_cpus + workers * cpus
    if need + DATA_CPUS > total_cpu:
        raise ClusterError(
            f"one trial needs {need:g} CPUs (tune.driver_cpus={tn.driver_cpus:g} + {workers} workers × "
            f"{cpus:g}) + {DATA_CPUS:g} for Ray Data's tokenising tasks but the cluster has {total_cpu:g}; "
            "use fewer or smaller workers per trial")
    worst = apply_overrides(cfg, {"train.num_workers": workers, "train.cpus_per_worker": cpus,
                                  "train.use_gpu": use_gpu,
                                  "train.gpus_per_worker": gpus or tc.gpus_per_worker})
    preflight(worst, cfg.tune.storage_path)
    fits = int((total_cpu - DATA_CPUS) // need)
    if gpus:
        fits = min(fits, int(total_gpu // (workers * gpus)))
    if tn.max_concurrent_trials > fits:
        log.warning("tune.max_concurrent_trials=%d: the cluster (%g CPUs, %g GPUs) holds %d trials of %g CPUs%s "
                    "at once with %g CPU left for Ray Data; running %d at a time", tn.max_concurrent_trials,
                    total_cpu, total_gpu, fits, need, f" + {workers * gpus:g} GPUs" if gpus else "",
                    DATA_CPUS, fits)
        return apply_overrides(cfg, {"tune.max_concurrent_trials": fits})
    return cfg


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A search's name, directory and the config every trial starts from."""

    name: str
    dir: Path
    cfg: Config


def new_experiment(cfg: Config) -> Experiment:
    """Validate everything that can be checked without Ray, then lay out the experiment directory."""
    from distilray.distill.objective import objective_for
    from distilray.train.run import default_run_name, prepare_run

    check_tune_config(cfg)
    name = cfg.tune.name or default_run_name().replace("distilray-", "tune-")
    cfg = absolutize_paths(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, name=name)))
    exp_dir = Path(cfg.tune.storage_path) / name
    if (exp_dir / CONFIG_FILE).exists():
        raise ConfigError(f"experiment {exp_dir} already exists; continue it with "
                          f"`distilray tune --resume {name} --storage-path {cfg.tune.storage_path}` "
                          "or choose another tune.name")
    # Model, data and step arithmetic of the base config (and so of every trial) fail here.
    prepare_run(trial_config(cfg, {}, str(exp_dir), "preflight"), objective_for(cfg))
    return Experiment(name, exp_dir, cfg)


def load_experiment(name: str, storage_path: str) -> Experiment:
    exp_dir = Path(resolve_storage(storage_path)) / name
    if not (exp_dir / CONFIG_FILE).exists():
        raise ConfigError(f"no experiment {name!r} under {resolve_storage(storage_path)} (no {CONFIG_FILE}); "
                          "pass --storage-path where it lives")
    return Experiment(name, exp_dir, load_config(exp_dir / CONFIG_FILE))


def _tuner(exp: Experiment, resume: bool):
    from ray import tune

    cfg = exp.cfg
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config_to_dict(cfg), exp_dir=str(exp.dir)),
        {"cpu": cfg.tune.driver_cpus})
    if resume:
        return tune.Tuner.restore(str(exp.dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    tc = cfg.tune
    return tune.Tuner(
        trainable,
        param_space=build_param_space(tc.space, tc.search_alg),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, search_alg=make_search_alg(cfg), scheduler=make_scheduler(cfg),
            num_samples=tc.num_samples,
            max_concurrent_trials=tc.max_concurrent_trials if tc.search_alg == "optuna" else None),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=str(exp.dir.parent), verbose=0,
            callbacks=[_progress_callback(exp.dir, tc.metric, tc.mode, count_trials(cfg), tc.scheduler)]),
    )


def run_tune(cfg: Config, resume: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """`distilray tune`: validate, search, export the best checkpoint, write the report."""
    from distilray.report import write_report

    exp = load_experiment(resume, cfg.tune.storage_path) if resume else new_experiment(cfg)
    cfg = exp.cfg
    if dry_run:
        return {"dry_run": True, "name": exp.name, "experiment": str(exp.dir),
                "trials": count_trials(cfg), "search_alg": cfg.tune.search_alg,
                "scheduler": cfg.tune.scheduler}
    connect_ray(min_cpus=cfg.tune.driver_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker)
    cfg = preflight_cluster(cfg)
    exp = dataclasses.replace(exp, cfg=cfg)
    from ray import tune

    if resume and not tune.Tuner.can_restore(str(exp.dir)):
        raise ConfigError(f"experiment {exp.dir} has no Tune state to resume (it stopped before its first "
                          "trial was scheduled); start it again under a new name")
    exp.dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (exp.dir / CONFIG_FILE).write_text(
            f"# distilray tune --resume {exp.name} --storage-path {exp.dir.parent}\n" + dump_config(cfg))
    tc = cfg.tune
    log.info("%s experiment %s: %d trials (%s search, %s scheduler, %d at a time), optimising %s (%s); "
             "trial workers: %d × %g CPU", "resuming" if resume else "starting", exp.dir,
             count_trials(cfg), tc.search_alg, tc.scheduler, tc.max_concurrent_trials, tc.metric, tc.mode,
             cfg.train.num_workers, cfg.train.cpus_per_worker)
    started = time.time()
    results = _tuner(exp, bool(resume)).fit()
    errors = [r for r in results if r.error is not None]
    best = export_best(exp.dir, tc.metric, tc.mode)
    report = write_report(exp.dir)
    summary = {"name": exp.name, "metric": tc.metric, "experiment": str(exp.dir),
               "trials": len(results), "errors": len(errors),
               "best": best, "report": report.get("html"), "wall_time_s": round(time.time() - started, 1)}
    if best is None:
        raise RunFailed(f"no trial of {exp.dir} produced a checkpoint ({len(errors)} errored); "
                             f"see {exp.dir}/*/error.txt")
    return summary


# --------------------------------------------------------------------------- best model


def find_checkpoints(exp_dir: Path) -> list[dict[str, Any]]:
    """Every checkpoint on disk under runs/, with the metrics it was saved with."""
    found = []
    for meta in sorted((exp_dir / RUNS_DIR).glob("*/checkpoint-step*/distilray.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or torn by a crash
        if not (meta.parent / "config.json").exists():
            continue
        found.append({"trial_id": meta.parent.parent.name, "path": str(meta.parent),
                      "step": info.get("step"), "metrics": info.get("metrics", {})})
    return found


def select_best(checkpoints: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best checkpoint by metric; ties go to the earlier step (less training, same score)."""
    best = None
    for ckpt in checkpoints:
        value = ckpt["metrics"].get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or is_better(value, best["metrics"][metric], mode):
            best = ckpt
    return best


def trial_params(exp_dir: Path, trial_id: str) -> dict[str, Any]:
    """The sampled values of a trial, from Tune's params.json."""
    for params in exp_dir.glob(f"*{trial_id}*/params.json"):
        try:
            return json.loads(params.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def export_best(exp_dir: Path, metric: str, mode: str) -> dict[str, Any] | None:
    """Copy the best checkpoint to best/ (HF format, no optimizer state) atomically, and write best.json."""
    best = select_best(find_checkpoints(exp_dir), metric, mode)
    if best is None:
        return None
    info = {"trial_id": best["trial_id"], "checkpoint": best["path"], "step": best["step"],
            "metric": metric, "mode": mode, "params": trial_params(exp_dir, best["trial_id"]),
            "metrics": best["metrics"]}
    run_config = Path(best["path"]).parent / CONFIG_FILE
    if run_config.exists():
        import yaml

        info["config"] = yaml.safe_load(run_config.read_text())
    def build(tmp: Path) -> None:
        shutil.copytree(best["path"], tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*NOT_SERVED))
        write_json_atomic(tmp / BEST_FILE, info)

    replace_dir_atomic(build, exp_dir / BEST_DIR)
    write_json_atomic(exp_dir / BEST_FILE, info)
    return info
