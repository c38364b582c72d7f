"""`distilray <stage>`: the only place that parses arguments and prints.

Each `cmd_*` builds the config (preset, `--set`, then the flags through `FLAG_KEYS`), calls
one stage function with typed values, and prints what it returned. Heavy imports (ray, torch,
transformers) happen inside the stage modules, imported per command, so `distilray --help`
answers instantly. Exit codes: 0 done, 2 a usage, config or input problem (one line on
stderr; `--debug` shows the traceback), 1 a run that started and failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distilray import __version__
from distilray.errors import ConfigError, DistilrayError, RunFailed

log = logging.getLogger("distilray")

FLAG_KEYS: dict[str, dict[str, str]] = {
    "train": {"workers": "train.num_workers", "gpu": "train.use_gpu", "name": "train.name",
              "storage_path": "train.storage_path"},
    "tune": {"workers": "train.num_workers", "gpu": "train.use_gpu", "name": "tune.name",
             "storage_path": "tune.storage_path"},
    "distill": {"teacher": "distill.teacher", "student": "distill.student",
                "workers": "train.num_workers", "gpu": "train.use_gpu", "name": "train.name",
                "storage_path": "train.storage_path"},
    "serve": {"host": "serve.host", "port": "serve.port", "model": "serve.model"},
    "predict": {"text_column": "predict.text_column", "format": "predict.output_format",
                "backend": "predict.backend", "gpus_per_actor": "predict.gpus_per_actor"},
    "evaluate": {"backend": "predict.backend"},
    "pipeline": {"name": "pipeline.name", "store": "pipeline.store", "deploy": "pipeline.deploy",
                 "workers": "train.num_workers", "gpu": "train.use_gpu"},
}
"""Per command, the flags that set a config key (argparse dest → dotted key)."""


def flag_values(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config values the given flags set; an unset flag (None, or a switch left off) sets none."""
    out = {}
    for dest, key in FLAG_KEYS.get(command, {}).items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            out[key] = value
    return out


def load_args_config(args: argparse.Namespace):
    """The resolved config of a command line: preset, then `--set`, then the flags."""
    from distilray.config import load_config

    return load_config(args.config, args.overrides, flag_values(args.command, args))


# --------------------------------------------------------------------------- train, tune, distill


def cmd_train(args: argparse.Namespace) -> int:
    from distilray.distill.objective import objective_for
    from distilray.train.run import run_training

    cfg = load_args_config(args)
    summary = run_training(cfg, objective_for(cfg), dry_run=args.dry_run)
    if summary.get("dry_run"):
        _print_dry_run(summary)
        return 0
    _print_run_finished(summary)
    return 0


def _print_dry_run(summary: Mapping[str, Any]) -> None:
    plan = summary["plan"]
    print(f"dry run OK: run '{summary['run_name']}', {plan['total_steps']} steps on "
          f"{summary['num_workers']} worker(s); checkpoints under {summary['run_dir']}")


def _print_run_finished(summary: Mapping[str, Any]) -> None:
    best, metrics = summary.get("best_checkpoint"), summary.get("best_metrics") or {}
    if not best:
        return
    acc = metrics.get("eval_accuracy")
    print(f"\nrun '{summary['run_name']}' finished: best checkpoint {best}"
          + (f" (eval_accuracy {acc:.4f})" if acc is not None else ""))
    print(f"serve it: distilray serve --checkpoint {best}")
    if summary.get("mlflow_run_id"):
        print(f"MLflow run: {summary['mlflow_run_id']}")


def cmd_tune(args: argparse.Namespace) -> int:
    from distilray.tune.search import run_tune

    cfg = load_args_config(args)
    summary = run_tune(cfg, resume=args.resume, dry_run=args.dry_run)
    if summary.get("dry_run"):
        print(f"dry run OK: experiment '{summary['name']}', {summary['trials']} trials "
              f"({summary['search_alg']} search, {summary['scheduler']} scheduler) under "
              f"{summary['experiment']}")
        print("\n".join(tune_plan_lines(summary)))
        return 0
    best, metric = summary["best"], summary["metric"]
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in sorted(best["params"].items()))
    print(f"\nexperiment '{summary['name']}': best trial {best['trial_id']} {metric} "
          f"{best['metrics'][metric]:.4f} ({params})")
    print(f"report: {summary['report']}")
    print(f"serve it: distilray serve --experiment {summary['experiment']}")
    return 0


def _space_line(key: str, spec: Mapping[str, Any]) -> str:
    if "values" in spec:
        return f"    {key}: {spec.get('type')} {spec['values']}"
    return f"    {key}: {spec.get('type')} {spec.get('low'):g} … {spec.get('high'):g}"


def tune_plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The trial plan of `distilray tune --dry-run`: what would run, where, and how it is cut."""
    fit, steps, confirm = plan["fit"], plan["steps"], plan["confirm"]
    gpu = f" + {fit['gpus_per_worker']:g} GPU" if fit["gpus_per_worker"] else ""
    lines = [f"  trials: {plan['trials']}, optimising {plan['metric']} ({plan['mode']})",
             f"  concurrency: {plan['concurrency']} at a time (tune.max_concurrent_trials="
             f"{plan['max_concurrent_trials']}; the cluster holds {fit['fits']})",
             f"  resources per trial: {fit['workers']} worker(s) × {fit['cpus_per_worker']:g} CPU{gpu} + "
             f"{fit['driver_cpus']:g} CPU driver = {fit['trial_cpus']:g} CPUs"
             + (f" + {fit['trial_gpus']:g} GPUs" if fit["trial_gpus"] else ""),
             f"  cluster: {fit['where']}: {fit['cluster_cpus']:g} CPUs, {fit['cluster_gpus']:g} GPUs"]
    if steps:
        lines.append(f"  steps per trial: {steps['steps_per_epoch']} per epoch, {steps['total_steps']} in all "
                     f"({plan['epochs']:g} epochs; {steps['train_rows']} train rows, {steps['eval_rows']} eval rows)")
    if plan["rungs"]:
        lines.append(f"  rungs (ASHA, epochs): {', '.join(f'{r:g}' for r in plan['rungs'])}; keeps the top "
                     f"1/{plan['reduction_factor']:g} of trials at each")
    else:
        lines.append(f"  rungs: none ({plan['scheduler']}: every trial runs {plan['epochs']:g} epochs)")
    lines.append(f"  seed confirmation: the top {confirm['top_k']} × {confirm['seeds']} more seeds = "
                 f"{confirm['runs']} extra runs" if confirm["runs"] else "  seed confirmation: off")
    lines.append("  space:")
    lines += [_space_line(k, v) for k, v in plan["space"].items()]
    return lines


def cmd_distill(args: argparse.Namespace) -> int:
    from distilray.distill.objective import run_distillation
    from distilray.distill.report import write_distill_report

    cfg = load_args_config(args)
    summary = run_distillation(cfg, dry_run=args.dry_run)
    if summary.get("dry_run"):
        _print_dry_run(summary)
        return 0
    report = write_distill_report(cfg, summary)
    student = report["student_checkpoint"]
    if report["text"] is None:
        print(f"student checkpoint: {student} (report skipped: the run directory is not local)")
        return 0
    print("\n" + report["text"])
    print(f"student checkpoint: {student}\nserve it: distilray serve --checkpoint {student}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from distilray.tune.report import write_report

    paths = write_report(args.experiment)
    print(f"report: {paths['html']}\n        {paths['md']}\n        {paths['csv']}")
    return 0


# --------------------------------------------------------------------------- serve, predict


def cmd_serve(args: argparse.Namespace) -> int:
    """`--stop`, else `--emit-config`, else `--detach`, else serve in the foreground."""
    mode = ("stop" if args.stop else "emit_config" if args.emit_config else
            "detach" if args.detach else "foreground")
    return SERVE_MODES[mode](args)


def cmd_serve_stop(args: argparse.Namespace) -> int:
    import os

    cfg = load_args_config(args)
    head = None if os.environ.get("RAY_ADDRESS") else _join_serve_head(start=False)
    from distilray.serve.lifecycle import serve_applications, shutdown_server  # Ray reads the env

    stopped = shutdown_server(cfg)
    print(f"stopped {cfg.serve.app_name}" if stopped else
          f"no application '{cfg.serve.app_name}' is running")
    if head is not None and not serve_applications():
        _stop_serve_head()
        print(f"stopped the Ray head `distilray serve --detach` started ({head.gcs_address})")
    return 0


def cmd_serve_emit_config(args: argparse.Namespace) -> int:
    from distilray.serve.app import serve_config_text

    cfg = load_args_config(args)
    if cfg.serve.model:  # written as given: the alias is resolved at each deploy
        from distilray.store import parse_model_ref

        text = serve_config_text(cfg, None, str(parse_model_ref(cfg.serve.model)))
    else:
        text = serve_config_text(cfg, _serve_checkpoint(args, cfg))
    Path(args.emit_config).write_text(text)
    print(f"wrote {args.emit_config}")
    return 0


def cmd_serve_detach(args: argparse.Namespace) -> int:
    import os

    from distilray.checkpoints import check_servable

    cfg = load_args_config(args)
    bundle = _serve_bundle(cfg)
    checkpoint = None if bundle else str(check_servable(_serve_checkpoint(args, cfg)))
    if not os.environ.get("RAY_ADDRESS"):  # a head that outlives this command
        from distilray.serve.app import full_scale_cpus

        _join_serve_head(start=True, min_cpus=full_scale_cpus(cfg.serve))
    from distilray.serve.lifecycle import start_server  # imports Ray, which reads the env once

    _print_serving(start_server(cfg, checkpoint, bundle))
    print("detached; stop it with `distilray serve --stop`")
    return 0


def cmd_serve_foreground(args: argparse.Namespace) -> int:
    from distilray.serve.lifecycle import serve_until_interrupted, start_server

    cfg = load_args_config(args)
    bundle = _serve_bundle(cfg)
    _print_serving(start_server(cfg, None if bundle else _serve_checkpoint(args, cfg), bundle))
    print("press Ctrl-C to stop", flush=True)
    serve_until_interrupted(cfg)
    return 0


def _serve_bundle(cfg: Any) -> dict[str, str] | None:
    """`--model STORE/NAME@ALIAS`: pinned to one version and verified here, before any deploy."""
    if not cfg.serve.model:
        return None
    from distilray.serve.app import pin_bundle
    from distilray.store import ModelStore

    bundle = pin_bundle(cfg.serve.model)
    ModelStore(bundle["store"]).local_bundle(bundle["name"], bundle["version"])
    print(f"{bundle['requested']} → {bundle['name']}@{bundle['version']}", flush=True)
    return bundle


SERVE_MODES = {"stop": cmd_serve_stop, "emit_config": cmd_serve_emit_config,
               "detach": cmd_serve_detach, "foreground": cmd_serve_foreground}


def _serve_checkpoint(args: argparse.Namespace, cfg: Any) -> str:
    from distilray.serve.app import resolve_checkpoint

    return resolve_checkpoint(args.checkpoint or (None if args.experiment else cfg.serve.checkpoint),
                              args.experiment)


def _print_serving(url: str) -> None:
    print(f"serving at {url}  (try: curl -X POST {url}/v1/classify -H 'Content-Type: "
          "application/json' -d '{\"text\": \"a great movie\"}')", flush=True)


def _join_serve_head(start: bool, min_cpus: float = 0.0) -> Any:
    """Point this process at the Ray head `--detach` keeps (see `cluster.serve_head`); call it
    before importing Ray, which reads RAY_AUTH_MODE when it is imported."""
    import os

    from distilray.cluster import serve_head, serve_head_dir

    state = serve_head(serve_head_dir(), start=start, min_cpus=min_cpus)
    if state is not None:
        os.environ.update(state.client_env())
    return state


def _stop_serve_head() -> None:
    import ray

    from distilray.cluster import cluster_down, serve_head_dir

    ray.shutdown()  # leave the cluster before its GCS goes away
    cluster_down(serve_head_dir(), purge=True)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.input:
        return cmd_predict_files(args)
    from distilray.client import read_texts

    texts = read_texts(args.texts, args.file)
    if args.checkpoint:
        preds = _predict_in_process(args, texts)
    else:
        import os

        from distilray.client import DEFAULT_TOKEN_ENV, classify

        token = args.token or os.environ.get(DEFAULT_TOKEN_ENV) or None
        preds = classify(args.url, texts, token=token, batch_size=args.batch_size)
    for text, pred in zip(texts, preds, strict=True):
        print(json.dumps({"text": text, **pred}) if args.json else
              f"{pred['label']}\t{pred['score']:.3f}\t{text}")
    return 0


def _predict_in_process(args: argparse.Namespace, texts: list[str]) -> list[dict[str, Any]]:
    """`predict TEXT… --checkpoint DIR`: the model in this process, no server, no Ray."""
    from dataclasses import asdict

    from distilray.batch.jobs import model_spec
    from distilray.serve.predictor import Predictor

    spec, _ = model_spec(load_args_config(args), args.checkpoint)
    predictor = Predictor(spec.checkpoint, max_length=spec.max_length, backend=spec.backend,
                          max_batch_tokens=spec.max_batch_tokens, dtype=spec.dtype)
    return [asdict(p) for p in predictor.predict(texts)]


def cmd_predict_files(args: argparse.Namespace) -> int:
    from distilray.batch.jobs import predict_files

    if not args.checkpoint or not args.output:
        raise ConfigError("`distilray predict --input PATH` needs --checkpoint DIR and --output DIR")
    summary = predict_files(load_args_config(args), args.checkpoint, args.input, args.output,
                            resume=args.resume)
    rate = summary["rows_per_s"]
    print(f"predicted {summary['predicted']} of {summary['rows']} rows ({summary['errors']} with "
          f"errors) from {summary['files']} file(s)"
          + (f", {summary['shards_resumed']} resumed" if summary["shards_resumed"] else "")
          + (f", {rate:.1f} rows/s" if rate else "") + f" → {summary['output']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distilray.batch.jobs import evaluate_checkpoint

    report = evaluate_checkpoint(load_args_config(args), args.checkpoint, args.data,
                                 split=args.split, output=args.output)
    print(f"{report['checkpoint']['id']} on {report['data']['spec']} [{report['data']['split']}], "
          f"{report['eval_count']} rows: eval_accuracy {report['eval_accuracy']:.4f}  "
          f"eval_macro_f1 {report['eval_macro_f1']:.4f}  eval_loss {report['eval_loss']:.4f}  "
          f"eval_ece {report['eval_ece']:.4f}")
    print(f"wrote {report['files']['json']} and {report['files']['md']}")
    if report.get("mlflow_run_id"):
        print(f"MLflow run: {report['mlflow_run_id']}")
    return 0


# --------------------------------------------------------------------------- promote, models


def cmd_promote(args: argparse.Namespace) -> int:
    from distilray.lifecycle.gate import Gate, parse_bars
    from distilray.lifecycle.promote import Promotion, promote

    if bool(args.checkpoint) == bool(args.experiment):
        raise ConfigError("pass exactly one of --checkpoint DIR or --experiment DIR")
    store = _store_arg(args.to, "--to")
    gate = Gate(minimum=parse_bars(args.min, "--min"), maximum=parse_bars(args.max, "--max"),
                tolerance=args.tolerance, compare=(args.metric,))
    cfg = load_args_config(args)
    summary = promote(cfg, Promotion(args.checkpoint or args.experiment, store, args.name,
                                     alias=args.alias, eval_data=args.eval_data,
                                     eval_split=args.split, gate=gate))
    shown = "  ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    verb = "already stored as" if summary["reused"] else "stored as"
    print(f"{summary['model']}: {verb} {summary['version']} ({summary['uri']}); {shown} on "
          f"{summary['eval']['data']} [{summary['eval']['split']}], {summary['eval']['rows']} rows")
    if summary["current_metrics"]:
        was = "  ".join(f"{k} {v:.4f}" for k, v in summary["current_metrics"].items())
        print(f"  {summary['alias']} was {summary['previous']}: {was}")
    print(f"{summary['model']}@{summary['alias']} → {summary['version']}"
          + (f" (MLflow model version {summary['mlflow_version']})" if summary["mlflow_version"] else ""))
    if args.deploy:
        _deploy(cfg, store, summary)
    return 0


def _deploy(cfg: Any, store: str, summary: Mapping[str, Any]) -> None:
    """`promote --deploy`: move the running application to the promoted version in place."""
    import os

    from distilray.lifecycle.promote import with_model

    joined = os.environ.get("RAY_ADDRESS") or ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    head = None if joined else _join_serve_head(start=False)
    from distilray.serve.lifecycle import serve_applications, start_server  # Ray reads the env

    if not joined and head is None:
        raise ConfigError("--deploy: no running application found (start one with `distilray "
                          "serve --model STORE/NAME@production --detach`, or set RAY_ADDRESS)")
    cfg = with_model(cfg, f"{store}/{summary['model']}@{summary['version']}")
    if cfg.serve.app_name not in serve_applications():
        raise ConfigError(f"--deploy: no application '{cfg.serve.app_name}' is running on this "
                          "cluster (serve.app_name)")
    bundle = {"store": store, "name": summary["model"], "version": summary["version"],
              "requested": f"{store}/{summary['model']}@{summary['alias']}"}
    url = start_server(cfg, None, bundle)
    print(f"deployed {summary['model']}@{summary['version']} to {cfg.serve.app_name} at {url}")


def _store_arg(value: str | None, flag: str) -> str:
    import os

    from distilray.store import STORE_ENV

    store = value or os.environ.get(STORE_ENV)
    if not store:
        raise ConfigError(f"no model store: pass {flag} STORE (a directory or s3:// / gs:// URI) "
                          f"or set ${STORE_ENV}")
    return store


def _model_arg(args: argparse.Namespace) -> Any:
    from distilray.store import parse_model_ref

    return parse_model_ref(args.model, args.store)


def cmd_models(args: argparse.Namespace) -> int:
    return MODELS_ACTIONS[args.action](args)


def cmd_models_list(args: argparse.Namespace) -> int:
    from distilray.store import ModelStore

    if args.model:
        raise ConfigError("`distilray models list` takes no model; use --store STORE")
    store = ModelStore(_store_arg(args.store, "--store"))
    names = store.names()
    if not names:
        print(f"no models in {store.root}")
    for name in names:
        aliases = store.aliases(name)
        versions = store.versions(name)
        pointers = ", ".join(f"{a}→{v}" for a, v in sorted(aliases.items())) or "no aliases"
        print(f"{name}\t{len(versions)} version(s), latest {versions[-1]}\t{pointers}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from distilray.store import ModelStore

    if not args.model:
        raise ConfigError("`distilray models show` needs a model: NAME[@VERSION|@ALIAS]")
    ref = _model_arg(args)
    store = ModelStore(ref.store)
    if ref.ref is None and not args.json:
        for version in store.versions(ref.name):
            d = store.describe(ref.name, version)
            acc = d["eval"].get("eval_accuracy")
            print(f"{version}\t{d['created']}\t"
                  + (f"eval_accuracy {acc:.4f}" if acc is not None else "no eval")
                  + (f"\t[{', '.join(d['aliases'])}]" if d["aliases"] else ""))
        for record in store.history(ref.name):
            print(f"  {record['at']} {record['action']}: {record['alias']} "
                  f"{record.get('previous') or '-'} → {record['version']}")
        return 0
    d = store.describe(ref.name, store.resolve(ref.name, ref.ref))
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    ev, src = d["eval"], d["lineage"].get("source", {})
    print(f"{d['model']}@{d['version']}  {d['uri']}  aliases: {', '.join(d['aliases']) or '-'}")
    print(f"  created {d['created']}, {len(d['files'])} files, "
          f"{sum(d['files'].values()) / 1e6:.1f} MB")
    if ev:
        print(f"  eval: eval_accuracy {ev.get('eval_accuracy', float('nan')):.4f}  eval_macro_f1 "
              f"{ev.get('eval_macro_f1', float('nan')):.4f} on {ev.get('data', {}).get('spec')} "
              f"[{ev.get('data', {}).get('split')}], {ev.get('eval_count')} rows")
    print(f"  source: {src.get('checkpoint_id')} ({src.get('checkpoint')})")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from distilray.lifecycle.promote import rollback

    if not args.model:
        raise ConfigError("`distilray models rollback` needs a model: NAME")
    ref = _model_arg(args)
    if ref.ref:
        raise ConfigError(f"rollback moves an alias; pass NAME and --alias, not {ref.name}@{ref.ref}")
    out = rollback(ref.store, ref.name, alias=args.alias, to=args.to)
    print(f"{out['model']}@{out['alias']} → {out['version']} (was {out['previous']})")
    return 0


MODELS_ACTIONS = {"list": cmd_models_list, "show": cmd_models_show, "rollback": cmd_models_rollback}


def cmd_pipeline(args: argparse.Namespace) -> int:
    from distilray.lifecycle.pipeline import check_pipeline, run_pipeline, unique_run_name

    if args.storage_path:  # runs and searches both live there
        args.overrides += [f"train.storage_path={args.storage_path}",
                           f"tune.storage_path={args.storage_path}"]
    cfg = load_args_config(args)
    store, model = check_pipeline(cfg)
    p = cfg.pipeline
    stages = ["tune" if p.search else "train", *(["distill"] if p.distill else []),
              "evaluate + gate", f"promote to {store}/{model}@{p.alias}", *(["deploy"] if p.deploy else [])]
    if args.dry_run:
        print(f"dry run OK: {' → '.join(stages)}; runs named like {unique_run_name(p.name)}")
        return 0
    print(f"pipeline: {' → '.join(stages)}", flush=True)
    record = run_pipeline(cfg)
    promoted = record["promoted"]
    shown = "  ".join(f"{k} {v:.4f}" for k, v in promoted["metrics"].items())
    print(f"pipeline {record['name']}: {model}@{p.alias} → {promoted['version']} ({shown}); "
          f"record: {record.get('file', '-')}")
    if p.deploy:
        _deploy(cfg, store, promoted)
    return 0


# --------------------------------------------------------------------------- quickstart, config


def cmd_quickstart(args: argparse.Namespace) -> int:
    from distilray.quickstart import preset_path, run_quickstart

    if args.config is None:
        args.config = preset_path()
    run_quickstart(load_args_config(args), keep_serving=args.keep_serving)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from distilray.config import dump_config

    print(dump_config(load_args_config(args)), end="")
    return 0


# --------------------------------------------------------------------------- cluster


def _cluster_dir(args: argparse.Namespace) -> Path:
    from distilray.cluster import default_state_dir

    return Path(args.dir).expanduser() if args.dir else default_state_dir()


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from distilray.cluster import ENV_FILE, cluster_up, fmt_num, plan_nodes

    nodes = plan_nodes(args.workers, args.head_cpus, args.worker_cpus, args.worker_gpus,
                       args.object_store_mb)
    state = cluster_up(_cluster_dir(args), nodes, timeout_s=args.timeout)
    print(f"Ray cluster up: {len(state.nodes)} nodes, dashboard {state.dashboard_url}, "
          f"GCS {state.gcs_address}, auth {state.auth_mode}")
    for node in state.nodes:
        print(f"  {node.name:<10} pid {node.pid:<7} CPU {fmt_num(node.num_cpus)} "
              f"GPU {node.num_gpus} {json.dumps(node.resources, sort_keys=True)}")
    print(f"Submit jobs with:\n  source {_cluster_dir(args) / ENV_FILE}\n"
          "  ray job submit --working-dir . -- distilray train --config configs/tiny.yaml "
          "--workers 2\nStop it with: distilray cluster down")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from distilray.cluster import cluster_down

    state_dir = _cluster_dir(args)
    state = cluster_down(state_dir, purge=args.purge)
    print("no cluster recorded in " + str(state_dir) if state is None else
          f"stopped {len(state.nodes)} nodes ({state.dashboard_url})")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from distilray.cluster import cluster_status

    status = cluster_status(_cluster_dir(args))
    print(f"dashboard {status['dashboard_url']}  GCS {status['gcs_address']}  "
          f"auth {status['auth_mode']}")
    for name, alive in status["processes"].items():
        print(f"  process {name}: {'running' if alive else 'gone'}")
    for n in status["nodes"]:
        custom = {k: v for k, v in n["resources_total"].items()
                  if k.startswith(("distilray", "CPU", "GPU"))}
        print(f"  node {n['node_id'][:12]} {n['state']:<5} head={n['is_head_node']} "
              f"{json.dumps(custom, sort_keys=True)}")
    if status["error"]:
        print(f"  cluster not answering: {status['error']}")
        return 1
    return 0 if all(status["processes"].values()) else 1


def cmd_cluster_submit(args: argparse.Namespace) -> int:
    from distilray.cluster import load_job_spec, submit_to_cluster

    if not args.spec:
        raise ConfigError("`distilray cluster submit` needs a job spec file, e.g. "
                          "cluster/jobs/train-tiny.yaml")
    spec = load_job_spec(args.spec)
    check_entrypoint(spec["entrypoint"])
    submitted = submit_to_cluster(spec, _cluster_dir(args))
    prefix = "RAY_AUTH_MODE=token " if submitted["auth_mode"] == "token" else ""
    print(f"submitted {submitted['submission_id']} to {submitted['address']}; follow it with:\n"
          f"  {prefix}ray job logs --address {submitted['address']} --follow "
          f"{submitted['submission_id']}")
    return 0


CLUSTER_ACTIONS = {"up": cmd_cluster_up, "down": cmd_cluster_down, "status": cmd_cluster_status,
                   "submit": cmd_cluster_submit}


def cmd_cluster(args: argparse.Namespace) -> int:
    return CLUSTER_ACTIONS[args.action](args)


def check_entrypoint(entrypoint: str, cwd: Path | None = None) -> argparse.Namespace:
    """Parse a `distilray ...` (or `python -m distilray ...`) entrypoint and load its config.

    Refuses before submission what could never run: an unknown subcommand or flag, a missing
    config file, an invalid key or value.
    """
    argv = shlex.split(entrypoint)
    if argv[:3] == ["python", "-m", "distilray"]:
        argv = argv[3:]
    elif argv[:1] == ["distilray"]:
        argv = argv[1:]
    else:
        raise ConfigError(f"entrypoint {entrypoint!r} is not a distilray command; expected "
                          "`distilray <stage> ...` or `python -m distilray <stage> ...`")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(argv)
    except SystemExit:
        reason = err.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        raise ConfigError(f"entrypoint {entrypoint!r} does not parse: {reason[0]}") from None
    if getattr(args, "config", None) is not None:
        base = cwd or Path.cwd()
        path = Path(args.config) if Path(args.config).is_absolute() else base / args.config
        from distilray.config import load_config

        load_config(path, args.overrides, flag_values(args.command, args))
    return args


# --------------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML preset (see configs/ and tune/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-5 (repeatable)")


def _add_run_args(p: argparse.ArgumentParser, what: str, storage_key: str) -> None:
    p.add_argument("--workers", type=int, help="data-parallel workers (train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")
    p.add_argument("--storage-path", help=f"where {what} live ({storage_key})")
    p.add_argument("--dry-run", action="store_true",
                   help="load and check config, data and model, then exit without running")


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - declarative: one add_argument per flag
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subcommand's unset
    # default from overwriting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="distilray", description="Fine-tune, tune, serve and distil DistilBERT on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"distilray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    p = add("train", "data-parallel fine-tuning with Ray Train", cmd_train)
    _add_config_args(p)
    _add_run_args(p, "runs and checkpoints", "train.storage_path")
    p.add_argument("--name", help="run name; rerun with the same name to resume")

    p = add("tune", "learning-rate × weight-decay search with Ray Tune", cmd_tune)
    _add_config_args(p)
    _add_run_args(p, "experiments", "tune.storage_path")
    p.add_argument("--resume", metavar="NAME", help="continue the experiment NAME after a crash")
    p.add_argument("--name", help="experiment name (tune.name)")

    p = add("report", "write the HTML/Markdown report of a Tune experiment", cmd_report)
    p.add_argument("experiment", help="experiment directory")

    p = add("serve", "serve a checkpoint over HTTP with Ray Serve", cmd_serve)
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint directory to serve (serve.checkpoint)")
    p.add_argument("--experiment", help="Tune experiment directory: serve its best/ checkpoint")
    p.add_argument("--detach", action="store_true", help="return once the app is healthy")
    p.add_argument("--emit-config", metavar="PATH",
                   help="write a Serve config file (serve run/deploy, RayService) and exit")
    p.add_argument("--model", help="a model-store version: STORE/NAME@production or @v3 "
                                   "(serve.model), instead of --checkpoint")
    p.add_argument("--host", help="HTTP host (serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (serve.port)")
    p.add_argument("--stop", action="store_true",
                   help="delete the running application (serve.app_name) and exit")

    p = add("predict", "classify texts (a server, a checkpoint, or files on Ray Data)", cmd_predict)
    _add_config_args(p)
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--checkpoint", help="classify with this checkpoint (a run or search directory "
                                        "means its best) instead of a server")
    p.add_argument("--input", help="batch mode: parquet/CSV/JSONL file, directory or glob "
                                   "(local, s3://, gs://)")
    p.add_argument("--output", help="batch mode: directory for the output shards")
    p.add_argument("--resume", action="store_true", help="batch mode: skip shards already done")
    p.add_argument("--text-column", help="batch mode: column with the texts (predict.text_column)")
    p.add_argument("--format", choices=["parquet", "jsonl"],
                   help="batch mode: output format (predict.output_format)")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8", "int8"], help="predict.backend")
    p.add_argument("--gpu", dest="gpus_per_actor", action="store_const", const=1.0,
                   help="batch mode: one GPU per model actor (predict.gpus_per_actor=1)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--file", help="file with one text per line")
    p.add_argument("--token", help="bearer token (default: $DISTILRAY_SERVE_TOKEN)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="texts per request (at most the server's serve.max_texts)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")

    p = add("evaluate", "measure a checkpoint on a labelled split (eval.json, eval.md)", cmd_evaluate)
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint, run or search directory")
    p.add_argument("--data", required=True, help="dataset spec, as data.dataset")
    p.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    p.add_argument("--output", help="where eval.json and eval.md go (default: the checkpoint)")
    p.add_argument("--backend", choices=["torch", "onnx", "onnx-int8", "int8"], help="predict.backend")

    p = add("promote", "evaluate a checkpoint, gate it, store it as a new version, move an alias",
            cmd_promote)
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint or `distilray train` run directory")
    p.add_argument("--experiment", help="`distilray tune` experiment directory (its best/)")
    p.add_argument("--to", metavar="STORE", help="model store: a directory or s3:// / gs:// URI "
                                                 "(default: $DISTILRAY_MODEL_STORE)")
    p.add_argument("--name", required=True, help="model name in the store")
    p.add_argument("--alias", default="production", help="alias to move (default: production)")
    p.add_argument("--eval-data", help="dataset spec to evaluate on (default: the run's data.dataset)")
    p.add_argument("--split", default="validation", help="eval split (default: validation)")
    p.add_argument("--min", action="append", default=[], metavar="METRIC=VALUE",
                   help="a bar the evaluation must reach, e.g. eval_accuracy=0.85 (repeatable)")
    p.add_argument("--max", action="append", default=[], metavar="METRIC=VALUE",
                   help="a bar the evaluation must stay under, e.g. eval_ece=0.05 (repeatable)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="how much worse than the alias's current version it may be (default 0)")
    p.add_argument("--metric", default="eval_accuracy",
                   help="metric compared with the current version (default: eval_accuracy)")
    p.add_argument("--deploy", action="store_true",
                   help="then move the running application (serve.app_name) to the new version")

    p = add("pipeline", "train or tune → distill → evaluate → promote, with new run names each time",
            cmd_pipeline)
    _add_config_args(p)
    _add_run_args(p, "runs", "train.storage_path / tune.storage_path")
    p.add_argument("--name", help="stem of the run names (pipeline.name)")
    p.add_argument("--store", help="model store (pipeline.store; default: $DISTILRAY_MODEL_STORE)")
    p.add_argument("--deploy", action="store_true", default=None,
                   help="then move the running application to the new version (pipeline.deploy)")

    p = add("models", "list, show and roll back the versions in a model store", cmd_models)
    p.add_argument("action", choices=list(MODELS_ACTIONS))
    p.add_argument("model", nargs="?", help="NAME, NAME@v3, NAME@production or STORE/NAME@...")
    p.add_argument("--store", help="model store (default: $DISTILRAY_MODEL_STORE)")
    p.add_argument("--alias", default="production", help="rollback: the alias to move")
    p.add_argument("--to", help="rollback: the version to point at (default: the previous one)")
    p.add_argument("--json", action="store_true", help="show: the whole record as JSON")

    p = add("distill", "train a smaller student from a fine-tuned teacher", cmd_distill)
    _add_config_args(p)
    p.add_argument("--teacher", help="teacher checkpoint directory (distill.teacher)")
    p.add_argument("--student", help="student: layers:K or a model name (distill.student)")
    _add_run_args(p, "runs and checkpoints", "train.storage_path")
    p.add_argument("--name", help="run name (train.name)")

    p = add("cluster", "start/stop a local multi-node Ray cluster", cmd_cluster)
    p.add_argument("action", choices=list(CLUSTER_ACTIONS))
    p.add_argument("spec", nargs="?", help="submit: a job spec file (see cluster/jobs/)")
    p.add_argument("--dir", help="where the cluster's state and logs live "
                                 "(default: $DISTILRAY_CLUSTER_DIR or ~/.distilray/cluster)")
    p.add_argument("--workers", type=int, default=1, help="up: worker nodes besides the head")
    p.add_argument("--head-cpus", type=float, default=3, help="up: logical CPUs of the head")
    p.add_argument("--worker-cpus", type=float, default=3, help="up: logical CPUs per worker node")
    p.add_argument("--worker-gpus", type=int, default=0, help="up: GPUs per worker node")
    p.add_argument("--object-store-mb", type=int, help="up: object store per node (default: Ray's)")
    p.add_argument("--timeout", type=float, default=120, help="up: seconds to wait for all nodes")
    p.add_argument("--purge", action="store_true", help="down: also delete state, logs, temp dir")

    p = add("quickstart", "the whole flow offline on a built-in demo corpus", cmd_quickstart)
    _add_config_args(p)
    p.add_argument("--keep-serving", action="store_true", help="leave the server running at the end")

    p = add("config", "print the resolved config (preset + --set) as YAML", cmd_config)
    p.add_argument("action", choices=["show"])
    _add_config_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a DistilrayError becomes one line on stderr and its exit code."""
    try:
        return args.func(args)
    except DistilrayError as exc:
        if args.debug:
            raise
        print(f"distilray {args.command}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunFailed) else 2
    except KeyboardInterrupt:
        print(f"distilray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
