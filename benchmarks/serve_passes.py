"""Forward-pass planning in `Predictor`: one padded pass per batch vs `plan_chunks`' split.

    python benchmarks/serve_passes.py [--model offline:minilm] [--overheads 16 32 64 128]

Random batches of SST-2 validation sentences (8 and 32 per batch) are classified in-process
with each `pass_overhead_tokens`; "one pass" (an overhead larger than any batch) pads every
text to the batch's longest, the behaviour before pass planning. Variants are interleaved,
3 rounds, same batches; sentences/s and the ratio to one pass are printed.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from serve_throughput import REPO, load_texts, make_checkpoint

ONE_PASS = 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline:minilm")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--overheads", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--batches", type=int, default=12, help="batches per size and round")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from distilray.serve.predictor import Predictor

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    ckpt = make_checkpoint(args.model, Path(tempfile.mkdtemp(prefix="serve-passes-")))
    texts = load_texts(Path(args.data))
    pred = Predictor(str(ckpt))
    rng = random.Random(0)
    variants = [ONE_PASS, *args.overheads]
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| batch | pass_overhead_tokens | sentences/s | vs one pass |")
    print("| ---: | --- | ---: | ---: |")
    for size in (8, 32):
        batches = [[rng.choice(texts) for _ in range(size)] for _ in range(args.batches)]
        seconds = dict.fromkeys(variants, 0.0)
        for _ in range(3):
            for v in variants:
                pred.pass_overhead_tokens = v
                pred.logits(batches[0])  # warm-up
                t0 = time.perf_counter()
                for b in batches:
                    pred.logits(b)
                seconds[v] += time.perf_counter() - t0
        n = 3 * len(batches) * size
        for v in variants:
            name = "one pass" if v == ONE_PASS else str(v)
            print(f"| {size} | {name} | {n / seconds[v]:.1f} | "
                  f"{seconds[ONE_PASS] / seconds[v]:.2f}× |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
