"""`distilray <stage>`: parse arguments, build the config, call one stage function.

Heavy imports (ray, torch, transformers) happen inside the stage functions so that
`distilray --help` answers instantly. Any `DistilrayError` becomes one line on stderr and
exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from distilray.errors import DistilrayError

log = logging.getLogger("distilray")

def _add_config_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument("--config", "-c", default=default_config,
                   help="YAML preset (see configs/ and tune/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-5 (repeatable)")


def _load(args: argparse.Namespace, extra: Sequence[str] = ()):
    from distilray.config import load_config

    return load_config(args.config, [*args.overrides, *extra])


def cmd_train(args: argparse.Namespace) -> int:
    extra = []
    if args.workers is not None:
        extra.append(f"train.num_workers={args.workers}")
    if args.gpu:
        extra.append("train.use_gpu=true")
    if args.name:
        extra.append(f"train.name={args.name}")
    if args.storage_path:
        extra.append(f"train.storage_path={args.storage_path}")
    cfg = _load(args, extra)
    from distilray.train import run_training

    run_training(cfg, dry_run=args.dry_run)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from distilray.quickstart import preset_path, run_quickstart

    if args.config is None:
        args.config = preset_path()
    run_quickstart(_load(args), keep_serving=args.keep_serving)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from distilray.tune import tune_main

    return tune_main(cfg, args)


def cmd_report(args: argparse.Namespace) -> int:
    from distilray.report import report_main

    return report_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from distilray.serve import serve_main

    return serve_main(cfg, args)


def cmd_predict(args: argparse.Namespace) -> int:
    from distilray.client import predict_main

    return predict_main(args)


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from distilray.distill import distill_main

    return distill_main(cfg, args)


def cmd_cluster(args: argparse.Namespace) -> int:
    from distilray.cluster import cluster_main

    return cluster_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distilray",
        description="Fine-tune, tune, serve and distil DistilBERT on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="data-parallel fine-tuning with Ray Train")
    _add_config_args(p)
    p.add_argument("--workers", type=int, help="number of data-parallel workers (train.num_workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.use_gpu=true)")
    p.add_argument("--name", help="run name; rerun with the same name to resume")
    p.add_argument("--storage-path", help="where runs and checkpoints live (train.storage_path)")
    p.add_argument("--dry-run", action="store_true",
                   help="load and check config, data and model, then exit without training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="learning-rate × weight-decay search with Ray Tune")
    _add_config_args(p)
    p.add_argument("--resume", metavar="NAME", help="continue the experiment NAME after a crash")
    p.add_argument("--name", help="experiment name (tune.name)")
    p.add_argument("--storage-path", help="where experiments live (tune.storage_path)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="write the HTML/Markdown report of a Tune experiment")
    p.add_argument("experiment", help="experiment directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve")
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="classify texts through a running server")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--file", help="file with one text per line")
    p.add_argument("--token", help="bearer token (default: $DISTILRAY_SERVE_TOKEN)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="texts per request (at most the server's serve.max_texts)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("distill", help="train a smaller student from a fine-tuned teacher")
    _add_config_args(p)
    p.add_argument("--teacher", help="teacher checkpoint directory (distill.teacher)")
    p.add_argument("--student", help="student: layers:K or a model name (distill.student)")
    p.add_argument("--workers", type=int, help="data-parallel workers (train.num_workers)")
    p.add_argument("--name", help="run name (train.name)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("cluster", help="start/stop a local multi-node Ray cluster")
    p.add_argument("action", choices=["up", "down", "status", "submit"])
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
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("quickstart", help="the whole flow offline on a built-in demo corpus")
    _add_config_args(p, default_config=None)
    p.add_argument("--keep-serving", action="store_true", help="leave the server running at the end")
    p.set_defaults(func=cmd_quickstart)
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
        return 2
    except KeyboardInterrupt:
        print(f"distilray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
