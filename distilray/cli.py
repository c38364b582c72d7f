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
    "serve": {"host": "serve.host", "port": "serve.port"},
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


def cmd_tune(args: argparse.Namespace) -> int:
    from distilray.tune import run_tune

    cfg = load_args_config(args)
    summary = run_tune(cfg, resume=args.resume, dry_run=args.dry_run)
    if summary.get("dry_run"):
        print(f"dry run OK: experiment '{summary['name']}', {summary['trials']} trials "
              f"({summary['search_alg']} search, {summary['scheduler']} scheduler) under "
              f"{summary['experiment']}")
        return 0
    best, metric = summary["best"], summary["metric"]
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in sorted(best["params"].items()))
    print(f"\nexperiment '{summary['name']}': best trial {best['trial_id']} {metric} "
          f"{best['metrics'][metric]:.4f} ({params})")
    print(f"report: {summary['report']}")
    print(f"serve it: distilray serve --experiment {summary['experiment']}")
    return 0


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
    from distilray.report import write_report

    paths = write_report(args.experiment)
    print(f"report: {paths['html']}\n        {paths['md']}\n        {paths['csv']}")
    return 0


# --------------------------------------------------------------------------- serve, predict


def cmd_serve(args: argparse.Namespace) -> int:
    from distilray.serve import serve_main

    return serve_main(load_args_config(args), args)


def cmd_predict(args: argparse.Namespace) -> int:
    import os

    from distilray.client import DEFAULT_TOKEN_ENV, classify, read_texts

    texts = read_texts(args.texts, args.file)
    token = args.token or os.environ.get(DEFAULT_TOKEN_ENV) or None
    preds = classify(args.url, texts, token=token, batch_size=args.batch_size)
    for text, pred in zip(texts, preds, strict=True):
        print(json.dumps({"text": text, **pred}) if args.json else
              f"{pred['label']}\t{pred['score']:.3f}\t{text}")
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


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--host", help="HTTP host (serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (serve.port)")
    p.add_argument("--stop", action="store_true",
                   help="delete the running application (serve.app_name) and exit")

    p = add("predict", "classify texts through a running server", cmd_predict)
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--file", help="file with one text per line")
    p.add_argument("--token", help="bearer token (default: $DISTILRAY_SERVE_TOKEN)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="texts per request (at most the server's serve.max_texts)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")

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
