"""ASHA vs FIFO on the same search: trial-epochs spent and the best accuracy found.

    python benchmarks/tune_efficiency.py [--data ../shared/data/sst2] [--trials 16] [--epochs 9]

Both searches sample the same configs (random search with one seed: lr log-uniform, wd from a
list) for the random-init `tiny` model on an SST-2 subset, 1 worker per trial, 2 trials at a
time on a local Ray cluster. FIFO runs every trial to the end; ASHA (grace 1 epoch, reduction
factor 3: rungs at 1, 3 and 9 epochs) stops weak trials. Goal: ASHA's best validation accuracy
within 1 point of FIFO's while spending ≤ 40% of FIFO's trial-epochs. Trial-epochs are the
epochs each trial trained (from its reports), summed over trials.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def search(args: argparse.Namespace, scheduler: str, name: str) -> dict:
    from distilray.config import load_config
    from distilray.files import read_jsonl
    from distilray.tune.search import run_tune
    from distilray.tune.summary import load_experiment_summary

    cfg = load_config(REPO / "tune" / "tiny-grid.yaml", [
        f"data.dataset={args.data}", f"data.max_train_samples={args.rows}", f"train.epochs={args.epochs}",
        "train.log_every_steps=1000", "train.max_failures=0",
        f"tune.space={{train.lr: {{type: loguniform, low: {args.lr_low}, high: {args.lr_high}}}, "
        "train.weight_decay: {type: choice, values: [0.0, 0.01, 0.1]}}",
        "tune.search_alg=random", f"tune.seed={args.seed}", f"tune.num_samples={args.trials}",
        f"tune.scheduler={scheduler}", "tune.grace_period=1", f"tune.reduction_factor={args.rf}",
        f"tune.max_concurrent_trials={args.concurrent}", f"tune.storage_path={args.storage}",
        f"tune.metric={args.metric}", f"tune.mode={'min' if args.metric == 'eval_loss' else 'max'}",
        f"tune.name={name}"])
    started = time.time()
    run_tune(cfg)
    wall = time.time() - started
    exp = load_experiment_summary(Path(args.storage) / name)
    trials = sorted(exp.trials, key=lambda t: (t.params["train.lr"], t.params["train.weight_decay"]))
    # best validation accuracy of each trial, whatever metric ASHA scheduled on
    acc = {t.trial_id: max((r["eval_accuracy"] for r in read_jsonl(Path(t.dir) / "result.json")
                            if "eval_accuracy" in r), default=float("nan")) for t in trials}
    return {"scheduler": scheduler, "wall_s": wall, "trials": len(trials),
            "trial_epochs": sum(t.epochs_run for t in trials),
            "best": max(acc.values()),
            "stopped": sum(t.stopped_early for t in trials),
            "configs": [(round(t.params["train.lr"], 12), t.params["train.weight_decay"]) for t in trials],
            "per_trial": [(t.params["train.lr"], t.params["train.weight_decay"], acc[t.trial_id], t.epochs_run)
                          for t in trials]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--rows", type=int, default=1000, help="training rows (SST-2 subset)")
    parser.add_argument("--rf", type=float, default=3.0, help="ASHA reduction factor")
    parser.add_argument("--lr-low", type=float, default=1e-4)
    parser.add_argument("--lr-high", type=float, default=1e-1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--storage", default="/tmp/distilray-bench")
    parser.add_argument("--metric", default="eval_accuracy", choices=["eval_accuracy", "eval_loss"],
                        help="what ASHA schedules on (the best accuracy is compared either way)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    ray.init(address="local", num_cpus=args.cpus, log_to_driver=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fifo = search(args, "fifo", f"bench-fifo-{stamp}")
    asha = search(args, "asha", f"bench-asha-{stamp}")
    ray.shutdown()
    assert fifo["configs"] == asha["configs"], "both searches must try the same configs"

    print("\n| trial (lr, wd) | FIFO best acc / epochs | ASHA best acc / epochs |")
    print("| --- | ---: | ---: |")
    for f, a in zip(fifo["per_trial"], asha["per_trial"], strict=True):
        print(f"| {f[0]:.2e}, {f[1]:g} | {f[2]:.4f} / {f[3]:g} | {a[2]:.4f} / {a[3]:g} |")
    print(f"\n{args.trials} trials × {args.epochs} epochs, {args.rows} SST-2 rows, tiny model, "
          f"{args.concurrent} at a time, ASHA rf {args.rf:g} on {args.metric}\n")
    print("| scheduler | trial-epochs | vs FIFO | stopped early | best accuracy | vs FIFO | wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in (fifo, asha):
        print(f"| {r['scheduler']} | {r['trial_epochs']:.1f} | {r['trial_epochs'] / fifo['trial_epochs']:.2f}× "
              f"| {r['stopped']} | {r['best']:.4f} | {100 * (r['best'] - fifo['best']):+.1f} pt "
              f"| {r['wall_s']:.0f} |")
    ratio = asha["trial_epochs"] / fifo["trial_epochs"]
    gap = 100 * (fifo["best"] - asha["best"])
    met = ratio <= 0.40 and gap <= 1.0
    print(f"\ngoal (≤ 0.40× trial-epochs, ≤ 1 pt below FIFO's best): {'met' if met else 'MISSED'} "
          f"({ratio:.2f}×, {gap:+.1f} pt)")


if __name__ == "__main__":
    main()
