"""`distilray tune`: search lr × weight decay (and more) with Ray Tune, every trial a `distilray train` run.

Follows Ray 2.60's documented way to tune a Train V2 `TorchTrainer`: a function trainable
(`run_trial`) is the driver of one Ray Train run — `train.prepare_run` + `train.fit`, the same
code as `distilray train` — and Train's reports reach Tune through `TuneReportCallback`. ASHA
(default) stops weak trials on the validation metric reported every epoch / K steps, with
`epoch` as its clock, so a trial that restarts after a crash keeps its place on the rungs.

This is the Ray glue; the space checks (`space`), the experiment directory (`experiment`) and
the report (`report`) are plain modules it calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from distilray import tracking
from distilray.config import Config, apply_overrides, config_from_dict, config_to_dict, dump_config
from distilray.distill.objective import objective_for
from distilray.errors import ClusterError, ConfigError, DistilrayError, RunFailed
from distilray.runtime import DATA_CPUS, connect_ray, local_cpus
from distilray.train.run import default_run_name, fit, preflight, prepare_run, read_metrics
from distilray.tune.experiment import (
    CONFIG_FILE,
    CONFIRM_DIR,
    CONFIRM_KEY,
    EVENTS_FILE,
    RUNS_DIR,
    Experiment,
    absolutize_paths,
    export_best,
    is_better,
    load_experiment,
    trial_config,
)
from distilray.tune.report import write_report
from distilray.tune.space import (
    asha_rungs,
    check_tune_config,
    count_trials,
    max_epochs,
    space_extremes,
)
from distilray.tune.summary import plan_confirmation, summarise_trials

log = logging.getLogger(__name__)

FREE_AFTER_S = 10.0
"""Seconds between a trial being stopped and freeing what its killed Train run still holds."""
END_POLL_S = 0.25
"""How often the end of a search checks whether the stopped runs' placement groups are gone."""
TIME_ATTR = "epoch"
"""ASHA's clock: the epoch (fractional between epochs) each report is made at."""


def format_params(params: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in params.items())


# --------------------------------------------------------------------------- search space and algorithms


def build_param_space(space: Mapping[str, Mapping[str, Any]], search_alg: str) -> dict[str, Any]:
    """tune.space → Ray Tune domains (grid search for `grid`, and for `choice` under search_alg grid)."""
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
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed))
    # The variant generator limits concurrency itself (TuneConfig's limit is for Searchers).
    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)


# --------------------------------------------------------------------------- one trial


class TrialReportCallback(TuneReportCallback):
    """Tune's documented Train→Tune callback, adding the step plan so reports say how far along they are."""

    def __init__(self, plan: Mapping[str, Any]) -> None:
        super().__init__()
        self.plan = dict(plan)

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [{**m, **self.plan} for m in metrics], checkpoint)


def run_trial(params: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """One Tune trial: the driver of one `distilray train` run with the trial's values."""
    trial_id = tune.get_context().get_trial_id()
    if CONFIRM_KEY in params:  # a seed-confirmation run: a top configuration with another seed
        params = dict(params[CONFIRM_KEY]["params"])
    cfg = trial_config(config_from_dict(base), params, exp_dir, trial_id)
    objective = objective_for(cfg)  # a distillation search trains students
    run = prepare_run(cfg, objective)
    plan = {"total_steps": run.plan.total_steps, "steps_per_epoch": run.plan.steps_per_epoch}
    # a distillation search's precomputed teacher logits are cached under runs/: one pass per search
    fit(run, objective, callbacks=[TrialReportCallback(plan)],
        parent_run=tracking.read_tracking(exp_dir))  # the search's MLflow run, if tracked


def run_placement_groups(run_dir: Path) -> set[str]:
    """Placement groups the workers of a Train run were placed in (from its metrics.jsonl)."""
    return {r["placement_group"] for r in read_metrics(run_dir)
            if r.get("event") == "worker" and r.get("placement_group")}


def held_placement_groups(ids: set[str]) -> set[str]:
    """Those of the placement groups `ids` that still exist (not yet removed)."""
    held = set()
    for hex_id in ids:
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
        try:
            if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
                held.add(hex_id)
        except Exception as exc:  # already gone, or the cluster is shutting down
            log.debug("placement group %s: %s", hex_id, exc)
    return held


def free_placement_groups(ids: set[str]) -> int:
    """Remove the worker placement groups of Train runs whose trial was stopped (its actor killed).

    Ray Train's PlacementGroupCleaner does this too, but it finds the cluster through the State
    API's address lookup, which fails on a host running several Ray clusters, and the group
    would hold its CPUs until the driver exits: later trials would wait for them forever.
    """
    freed = 0
    for hex_id in sorted(held_placement_groups(ids)):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
            freed += 1
        except Exception as exc:  # removed meanwhile, or the cluster is shutting down
            log.debug("placement group %s: %s", hex_id, exc)
    return freed


# --------------------------------------------------------------------------- progress


class Progress(Callback):
    """A Tune callback logging one line per trial state change, with the current best.

    Each change is also appended to events.jsonl (what the report reads for "stopped early"),
    and the placement groups of stopped trials' Train runs are freed FREE_AFTER_S later.
    """

    def __init__(self, exp_dir: Path, metric: str, mode: str, total: int, scheduler: str) -> None:
        self.exp_dir, self.metric, self.mode = exp_dir, metric, mode
        self.total, self.scheduler = total, scheduler
        self.states: dict[str, str] = {}
        self.to_free: dict[str, float] = {}
        """trial id → when to free the placement groups of its killed Train run."""

    def _free_due(self, now: float) -> None:
        for trial_id, due in list(self.to_free.items()):
            if due <= now:
                del self.to_free[trial_id]
                freed = free_placement_groups(run_placement_groups(self.exp_dir / RUNS_DIR / trial_id))
                if freed:
                    log.info("trial %s: freed %d placement group(s) of its stopped Train run",
                             trial_id, freed)

    def on_step_begin(self, iteration, trials, **info):
        if self.to_free:
            self._free_due(time.time())

    def on_experiment_end(self, trials, **info):
        """Return once no trial's Train run holds a placement group. Finished runs removed
        theirs, and Ray Train's cleaner usually removes a stopped run's within a second, so
        this rarely waits out FREE_AFTER_S (which every search used to: ~10 s each)."""
        while self.to_free:
            for trial_id in list(self.to_free):
                groups = run_placement_groups(self.exp_dir / RUNS_DIR / trial_id)
                if groups and not held_placement_groups(groups):
                    del self.to_free[trial_id]
            self._free_due(time.time())
            if self.to_free:
                time.sleep(END_POLL_S)

    def _best(self, trials) -> str:
        best, who = None, None
        for t in trials:
            value = t.metric_analysis.get(self.metric, {}).get(self.mode)
            if value is not None and is_better(value, best, self.mode):
                best, who = value, t.trial_id
        done = sum(state != "running" for state in self.states.values())
        head = f"[{done}/{self.total} finished]"
        return f"{head} best: {who} {self.metric} {best:.4f}" if who else f"{head} best: none yet"

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
                  "epoch": last.get(TIME_ATTR), self.metric: last.get(self.metric)}
        with open(self.exp_dir / EVENTS_FILE, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        log.info("trial %s %s%s | %s", trial.trial_id, state, detail, self._best(trials))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._emit(trials, trial, "running", f" ({format_params(trial.config)})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        epoch, value = last.get(TIME_ATTR), last.get(self.metric)
        total_steps, step = last.get("total_steps"), last.get("step")
        finished = total_steps is not None and step is not None and step >= total_steps
        tail = f" at epoch {epoch:.2f} ({self.metric} {value:.4f})" if value is not None else ""
        if finished:
            self._emit(trials, trial, "done", tail)
        else:
            self._emit(trials, trial, f"stopped early ({self.scheduler.upper()})", tail)
        # A trial stopped by the scheduler, even at its last report, had its actor killed
        # with the Train controller it owned; by FREE_AFTER_S both have exited.
        self.to_free[trial.trial_id] = time.time() + FREE_AFTER_S

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._emit(trials, trial, "retrying", " from its latest checkpoint (its driver failed)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._emit(trials, trial, "error", f" (see {trial.path})")
        self.to_free[trial.trial_id] = time.time() + FREE_AFTER_S


# --------------------------------------------------------------------------- driver


def trial_resources(cfg: Config) -> dict[str, Any]:
    """What the largest trial of the space asks for: its workers, CPUs and GPUs, and in all."""
    tc, tn = cfg.train, cfg.tune
    workers = max([tc.num_workers, *space_extremes(cfg, "train.num_workers")])
    cpus = max([tc.cpus_per_worker, *space_extremes(cfg, "train.cpus_per_worker")])
    use_gpu = any([tc.use_gpu, *space_extremes(cfg, "train.use_gpu")])
    gpus = max([tc.gpus_per_worker, *space_extremes(cfg, "train.gpus_per_worker")]) if use_gpu else 0.0
    return {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus, "use_gpu": use_gpu,
            "driver_cpus": tn.driver_cpus, "trial_cpus": tn.driver_cpus + workers * cpus,
            "trial_gpus": workers * gpus}


def cluster_fit(cfg: Config, nodes: list[Mapping[str, float]]) -> tuple[list[str], dict[str, Any]]:
    """Every reason no trial can run on these nodes, and how many trials they hold at once.

    Keeps DATA_CPUS free: trials whose Ray Data tasks find no CPU would wait forever.
    """
    res = trial_resources(cfg)
    cpus, gpus, need = res["cpus_per_worker"], res["gpus_per_worker"], res["trial_cpus"]
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    biggest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    total_cpu, total_gpu = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    problems = []
    if not any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        problems.append(
            f"a trial worker needs {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") +
            f" (train.cpus_per_worker{', train.gpus_per_worker' if gpus else ''}) but no node has that "
            f"much (largest: {biggest_cpu:g} CPU, {biggest_gpu:g} GPU); lower it or add bigger nodes")
    if not any(n.get("CPU", 0.0) >= res["driver_cpus"] for n in nodes):
        problems.append(f"tune.driver_cpus={res['driver_cpus']:g} but no node has that many CPUs "
                        f"(largest: {biggest_cpu:g}); lower tune.driver_cpus")
    if need + DATA_CPUS > total_cpu:
        problems.append(
            f"one trial needs {need:g} CPUs (tune.driver_cpus={res['driver_cpus']:g} + {res['workers']} "
            f"workers × {cpus:g}) + {DATA_CPUS:g} for Ray Data's tokenising tasks but the cluster has "
            f"{total_cpu:g}; use fewer or smaller workers per trial")
    fits = max(0, int((total_cpu - DATA_CPUS) // need)) if need > 0 else cfg.tune.max_concurrent_trials
    if gpus:
        fits = min(fits, int(total_gpu // res["trial_gpus"]))
    return problems, {**res, "fits": fits, "cluster_cpus": total_cpu, "cluster_gpus": total_gpu,
                      "nodes": len(nodes)}


def preflight_cluster(cfg: Config) -> Config:
    """Refuse trials no node (or the whole cluster) can ever hold, before any trial starts.

    Returns cfg with tune.max_concurrent_trials lowered to what the cluster holds at once.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    problems, fit = cluster_fit(cfg, nodes)
    if problems:
        raise ClusterError("; ".join(problems))
    worst = apply_overrides(cfg, {"train.num_workers": fit["workers"], "train.cpus_per_worker": fit["cpus_per_worker"],
                                  "train.use_gpu": fit["use_gpu"],
                                  "train.gpus_per_worker": fit["gpus_per_worker"] or cfg.train.gpus_per_worker})
    preflight(worst, cfg.tune.storage_path)
    fits, tn = fit["fits"], cfg.tune
    if tn.max_concurrent_trials > fits:
        log.warning("tune.max_concurrent_trials=%d: the cluster (%g CPUs, %g GPUs) holds %d trials of %g CPUs%s "
                    "at once with %g CPU left for Ray Data; running %d at a time", tn.max_concurrent_trials,
                    fit["cluster_cpus"], fit["cluster_gpus"], fits, fit["trial_cpus"],
                    f" + {fit['trial_gpus']:g} GPUs" if fit["trial_gpus"] else "", DATA_CPUS, fits)
        return apply_overrides(cfg, {"tune.max_concurrent_trials": fits})
    return cfg


def _named(cfg: Config) -> Experiment:
    name = cfg.tune.name or default_run_name().replace("distilray-", "tune-")
    cfg = absolutize_paths(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, name=name)))
    return Experiment(name, Path(cfg.tune.storage_path) / name, cfg)


def _exists_problem(exp: Experiment) -> str | None:
    if not (exp.dir / CONFIG_FILE).exists():
        return None
    return (f"experiment {exp.dir} already exists; continue it with `distilray tune --resume {exp.name} "
            f"--storage-path {exp.cfg.tune.storage_path}` or choose another tune.name")


def new_experiment(cfg: Config) -> Experiment:
    """Validate everything that can be checked without Ray, then lay out the experiment directory."""
    check_tune_config(cfg)
    exp = _named(cfg)
    problem = _exists_problem(exp)
    if problem:
        raise ConfigError(problem)
    # Model, data and step arithmetic of the base config (and so of every trial) fail here.
    prepare_run(trial_config(exp.cfg, {}, str(exp.dir), "preflight"), objective_for(exp.cfg))
    return exp


def dry_run_cluster(cfg: Config) -> tuple[list[dict[str, float]], str]:
    """The nodes a run would get: RAY_ADDRESS's cluster, else the private local Ray it would start."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        connect_ray()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        return nodes, f"the running cluster ({len(nodes)} node(s))"
    import torch

    cpus = local_cpus(cfg.tune.driver_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [{"CPU": float(cpus), "GPU": float(gpus)}], (
        f"a private local Ray on this machine ({cpus} logical CPUs on {os.cpu_count()} cores, {gpus} GPU(s);"
        " set RAY_ADDRESS to plan for a cluster)")


def dry_run_plan(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Check config, space, data, model and cluster fit without starting a trial; every problem at once."""
    exp = load_experiment(resume, cfg.tune.storage_path) if resume else _named(cfg)
    problems: list[str] = []
    try:
        check_tune_config(exp.cfg)
    except ConfigError as exc:
        problems += exc.problems
    if not resume and _exists_problem(exp):
        problems.append(_exists_problem(exp))
    steps: dict[str, Any] = {}
    try:
        run = prepare_run(trial_config(exp.cfg, {}, str(exp.dir), "preflight"), objective_for(exp.cfg))
        steps = {"steps_per_epoch": run.plan.steps_per_epoch, "total_steps": run.plan.total_steps,
                 "train_rows": run.splits.train.num_rows, "eval_rows": run.splits.eval.num_rows}
    except DistilrayError as exc:
        problems += getattr(exc, "problems", None) or [str(exc)]
    fit: dict[str, Any] = {}
    if not problems or all(not p.startswith("tune.space") for p in problems):
        nodes, where = dry_run_cluster(exp.cfg)
        fit_problems, fit = cluster_fit(exp.cfg, nodes)
        problems += fit_problems
        fit["where"] = where
    if problems:
        raise ConfigError(problems)
    tc = exp.cfg.tune
    return {"dry_run": True, "name": exp.name, "experiment": str(exp.dir), "trials": count_trials(exp.cfg),
            "search_alg": tc.search_alg, "scheduler": tc.scheduler, "metric": tc.metric, "mode": tc.mode,
            "max_concurrent_trials": tc.max_concurrent_trials,
            "concurrency": min(tc.max_concurrent_trials, fit["fits"]), "fit": fit, "steps": steps,
            "epochs": max_epochs(exp.cfg), "space": dict(tc.space),
            "rungs": asha_rungs(exp.cfg) if tc.scheduler == "asha" else [],
            "reduction_factor": tc.reduction_factor,
            "confirm": {"top_k": tc.confirm_top_k, "seeds": tc.confirm_seeds,
                        "runs": tc.confirm_top_k * tc.confirm_seeds}}


def _trainable(cfg: Config, exp_dir: Path):
    return tune.with_resources(
        tune.with_parameters(run_trial, base=config_to_dict(cfg), exp_dir=str(exp_dir)),
        {"cpu": cfg.tune.driver_cpus})


def make_tuner(exp: Experiment, resume: bool) -> tune.Tuner:
    """The Tuner of a new search, or the one restored from the experiment's Tune state."""
    cfg = exp.cfg
    trainable = _trainable(cfg, exp.dir)
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
            # A trial whose driver died (e.g. with its node) runs again; its Train run resumes
            # from its latest checkpoint (same run name). Dead workers are Train's max_failures.
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[Progress(exp.dir, tc.metric, tc.mode, count_trials(cfg), tc.scheduler)]),
    )


def run_confirmation(exp: Experiment) -> dict[str, Any]:
    """Rerun the search's top configurations with more seeds: a second Tuner, same trainable.

    Its trials live in <experiment>/confirm/ (their Train runs in confirm/runs/), so best/ stays
    the search's own pick; every run goes to its end (FIFO). A --resume continues it.
    """
    tc = exp.cfg.tune
    confirm_dir = exp.dir / CONFIRM_DIR
    plan = plan_confirmation(summarise_trials(exp.dir, tc.metric, tc.mode), tc.mode, tc.confirm_top_k,
                             tc.confirm_seeds, exp.cfg.train.seed)
    if not plan:
        log.warning("seed confirmation skipped: no trial of %s finished", exp.dir)
        return {"runs": 0, "errors": 0}
    confirm_dir.mkdir(parents=True, exist_ok=True)
    trainable = _trainable(exp.cfg, confirm_dir)
    log.info("seed confirmation: the top %d configuration(s) × %d more seeds = %d runs, %d at a time",
             len({p["source"] for p in plan}), tc.confirm_seeds, len(plan), tc.max_concurrent_trials)
    if tune.Tuner.can_restore(str(confirm_dir)):
        tuner = tune.Tuner.restore(str(confirm_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={CONFIRM_KEY: tune.grid_search(plan)},
            tune_config=tune.TuneConfig(
                metric=tc.metric, mode=tc.mode, scheduler=FIFOScheduler(), num_samples=1,
                search_alg=BasicVariantGenerator(max_concurrent=tc.max_concurrent_trials)),
            run_config=tune.RunConfig(
                name=CONFIRM_DIR, storage_path=str(exp.dir), verbose=0,
                callbacks=[Progress(confirm_dir, tc.metric, tc.mode, len(plan), "fifo")]))
    results = tuner.fit()
    return {"runs": len(results), "errors": sum(r.error is not None for r in results)}


def run_tune(cfg: Config, resume: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """`distilray tune`: validate, search, export the best checkpoint, confirm seeds, write the report."""
    if dry_run:
        return dry_run_plan(cfg, resume)
    exp = load_experiment(resume, cfg.tune.storage_path) if resume else new_experiment(cfg)
    cfg = exp.cfg
    connect_ray(min_cpus=cfg.tune.driver_cpus + cfg.train.num_workers * cfg.train.cpus_per_worker)
    cfg = preflight_cluster(cfg)
    exp = dataclasses.replace(exp, cfg=cfg)
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
    parent = tracking.start_search_run(cfg, exp.dir)  # its trials log child runs under it
    results = make_tuner(exp, bool(resume)).fit()
    errors = [r for r in results if r.error is not None]
    best = export_best(exp.dir, tc.metric, tc.mode)
    confirm = run_confirmation(exp) if tc.confirm_top_k and tc.confirm_seeds and best else None
    tracking.end_search_run(parent, best)
    report = write_report(exp.dir)
    summary = {"name": exp.name, "metric": tc.metric, "experiment": str(exp.dir),
               "trials": len(results), "errors": len(errors), "confirm": confirm,
               "best": best, "report": report.get("html"), "wall_time_s": round(time.time() - started, 1)}
    if best is None:
        raise RunFailed(f"no trial of {exp.dir} produced a checkpoint ({len(errors)} errored); "
                             f"see {exp.dir}/*/error.txt")
    return summary
