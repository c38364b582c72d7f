"""`distilray <stage>`: parse arguments, build the config, call one stage function.

Heavy imports (ray, torch, transformers) happen inside the stage functions so that
`distilray --help` answers instantly. Any `DistilrayError` becomes one line on stderr and
exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from distilray.errors import DistilrayError

log = logging.getLogger("distilray")

PENDING = {
    "tune": "Ray Tune: learning-rate × weight-decay search with early stopping, resume and a real report",
    "report": "Ray Tune: learning-rate × weight-decay search with early stopping, resume and a real report",
    "serve": "Ray Serve: the best checkpoint as autoscaling, batched, hardened HTTP inference",
    "predict": "Ray Serve: the best checkpoint as autoscaling, batched, hardened HTTP inference",
    "distill": "Knowledge distillation: a fine-tuned teacher trains a smaller, faster student",
    "cluster": "Run anywhere: `ray job submit` on a multi-node cluster, and KubeRay manifests",
}


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
    from distilray.quickstart import run_quickstart

    run_quickstart(_load(args), keep_serving=args.keep_serving)
    return 0


def _pending(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise DistilrayError(f"'distilray {stage}' is not implemented yet (planned in: {PENDING[stage]})")

    return run


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
    p.set_defaults(func=_pending("tune"))

    p = sub.add_parser("report", help="write the HTML/Markdown report of a Tune experiment")
    p.add_argument("experiment", help="experiment directory")
    p.set_defaults(func=_pending("report"))

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve")
    _add_config_args(p)
    p.set_defaults(func=_pending("serve"))

    p = sub.add_parser("predict", help="classify texts through a running server")
    p.set_defaults(func=_pending("predict"))

    p = sub.add_parser("distill", help="train a smaller student from a fine-tuned teacher")
    _add_config_args(p)
    p.set_defaults(func=_pending("distill"))

    p = sub.add_parser("cluster", help="start/stop a local multi-node Ray cluster")
    p.set_defaults(func=_pending("cluster"))

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
