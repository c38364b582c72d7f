"""Teacher vs distilled student vs the same student without distillation (alpha = 0), on SST-2.

    python benchmarks/distill.py --teacher RUN_OR_CHECKPOINT_DIR [--train-samples 8000] [--workers 2]

Trains two `layers:3` students of the teacher with configs/distill.yaml — one with the KD loss
(alpha from the preset), one with alpha = 0 (plain cross-entropy, same initialisation, same
batches) — then measures all three checkpoints in this process on the same validation batches:
accuracy, macro-F1, size and CPU samples/s (1 torch thread, fastest of 5 interleaved passes).
Goals (issue 8): the KD student keeps >= 97% of the teacher's accuracy and is >= 1.6x faster.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from distilray.config import apply_overrides, load_config
from distilray.data import load_splits
from distilray.distill.objective import DistillObjective, run_distillation
from distilray.distill.report import measure_checkpoints, render_report, retention

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint or `distilray train` run dir")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/sst2"))
    parser.add_argument("--student", default="layers:3")
    parser.add_argument("--train-samples", type=int, default=16000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storage", default="/tmp/distilray-bench-distill")
    parser.add_argument("--name", default=time.strftime("bench-%Y%m%d-%H%M%S"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the CPU speed test")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    base = load_config(REPO / "configs" / "distill.yaml", [
        f"distill.teacher={args.teacher}", f"distill.student={args.student}", f"data.dataset={args.data}",
        f"data.max_train_samples={args.train_samples}", f"train.num_workers={args.workers}",
        f"train.storage_path={args.storage}", "train.max_failures=1", "train.log_every_steps=50",
        *args.overrides])
    base = DistillObjective().prepare(base)  # the teacher resolved; its vocabulary tokenises
    started = time.time()
    kd = run_distillation(apply_overrides(base, {"train.name": f"{args.name}-kd"}))
    kd_time = time.time() - started
    started = time.time()
    ce = run_distillation(apply_overrides(base, {"train.name": f"{args.name}-alpha0", "distill.alpha": 0.0}))
    ce_time = time.time() - started

    ev = load_splits(base.data, base.model.num_labels).eval
    scores = measure_checkpoints(
        {"teacher": base.distill.teacher, f"student {args.student} (KD)": kd["best_checkpoint"],
         f"student {args.student} (alpha=0)": ce["best_checkpoint"]},
        ev.column("text").to_pylist(), ev.column("label").to_pylist(), base.data.max_length,
        batch_size=32, threads=args.threads)
    d = base.distill
    print(f"\nteacher: {base.distill.teacher}")
    print(f"students: {args.student}, {base.train.epochs} epoch(s) on {args.train_samples} SST-2 sentences, "
          f"{args.workers} workers × batch {base.train.batch_size}, lr {base.train.lr}, "
          f"T={d.temperature}, KD alpha={d.alpha}, teacher logits {d.teacher_logits}; "
          f"training wall time KD {kd_time:.0f}s, alpha=0 {ce_time:.0f}s")
    print(f"{len(ev)} validation sentences; CPU: batch 32, {args.threads} torch thread(s), "
          "fastest of 5 interleaved passes\n")
    print(render_report(scores))
    kd_row = retention(scores)[scores[1].name]
    print(f"goal: accuracy retention {kd_row['accuracy_retention']:.1%} (>= 97%): "
          f"{'met' if kd_row['accuracy_retention'] >= 0.97 else 'MISSED'}; speed-up "
          f"{kd_row['speedup']:.2f}× (>= 1.6×): {'met' if kd_row['speedup'] >= 1.6 else 'MISSED'}")


if __name__ == "__main__":
    main()
