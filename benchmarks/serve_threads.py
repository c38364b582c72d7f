"""Which thread runs a replica's torch work: the model loaded on one thread and forwards on
another (what `asyncio.to_thread` gave the Classifier before) vs everything on one thread.

    python benchmarks/serve_threads.py [--model offline:minilm] [--rounds 3] [--batches 60]

Each variant runs in a fresh process (thread teams are per-process state), in turns, on
batches of 16 SST-2 validation sentences through `Predictor.predict`, with
`torch.set_num_threads(<cores>)`. Prints texts/s, the process's CPU use, and the ratio of
the one-thread variant to the two-thread one per round.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def measure(variant: str, ckpt: str, data: str, batches: int) -> tuple[float, float]:
    """(texts/s, CPU %) of `batches` forward batches, in this process."""
    import torch
    from serve_throughput import cpu_count, load_texts

    from distilray.serve.predictor import Predictor

    texts = load_texts(Path(data))
    pool = ThreadPoolExecutor(1)

    def load() -> Predictor:
        torch.set_num_threads(cpu_count())
        return Predictor(ckpt)

    if variant == "load-here-forward-there":
        pred = load()
        pred.predict(texts[:4])  # the old replica's warm-up, on the loading thread
    else:  # "one-thread": loading, warm-up and forwards on the pool's thread
        pred = pool.submit(load).result()
    batch = texts[:16]

    def run(n: int) -> None:
        for _ in range(n):
            pred.predict(batch)

    pool.submit(run, 5).result()
    cpu0, t0 = os.times(), time.perf_counter()
    pool.submit(run, batches).result()
    cpu1, elapsed = os.times(), time.perf_counter() - t0
    busy = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    return batches * len(batch) / elapsed, busy * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline:minilm")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rate, cpu = measure(args.child[0], args.child[1], args.data, args.batches)
        print(f"{rate:.3f} {cpu:.1f}")
        return

    from serve_throughput import make_checkpoint

    ckpt = make_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="serve-threads-")))
    variants = ["load-here-forward-there", "one-thread"]
    print(f"model {args.model}, batches of 16 x {args.batches}, {os.cpu_count()} CPUs")
    print("| round | variant | texts/s | CPU % |\n| ---: | --- | ---: | ---: |")
    ratios = []
    for r in range(1, args.rounds + 1):
        rates = {}
        for v in variants:
            out = subprocess.run([sys.executable, __file__, "--child", v, str(ckpt), "--data",
                                  args.data, "--batches", str(args.batches)],
                                 capture_output=True, text=True, check=True).stdout.split()
            rates[v] = float(out[-2])
            print(f"| {r} | {v} | {rates[v]:.1f} | {float(out[-1]):.0f} |", flush=True)
        ratios.append(rates["one-thread"] / rates["load-here-forward-there"])
    print("one-thread vs load-here-forward-there, per round: "
          + ", ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    main()
