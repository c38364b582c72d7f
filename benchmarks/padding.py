"""Padded tokens per batch on SST-2 train: pad to max_length 128 vs dynamic vs bucketed.

    python benchmarks/padding.py [--data ../shared/data/sst2] [--batch-size 16]

Ratios are against padding to max_length (the reference recipe); lower is less wasted compute.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from distilray.config import DataConfig
from distilray.data import bucket_order, load_splits, padding_stats, tokenize_texts
from distilray.model import load_tokenizer, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--bucket-batches", type=int, default=100)
    args = parser.parse_args()

    train = load_splits(DataConfig(dataset=args.data), 2).train
    tok = load_tokenizer(resolve_model("offline:minilm"))
    t0 = time.time()
    ids = tokenize_texts(tok, train.column("text").to_pylist(), args.max_length)
    lengths = [len(r) for r in ids]
    print(f"{len(lengths)} rows tokenised in {time.time() - t0:.1f}s; mean length "
          f"{sum(lengths) / len(lengths):.1f} tokens, max {max(lengths)}")
    bs, ml = args.batch_size, args.max_length
    order = bucket_order(lengths, bs, args.bucket_batches, seed=0)
    rows = {
        "max_length 128 (reference)": padding_stats(lengths, bs, "max_length", ml, 8),
        "dynamic (multiple of 8)": padding_stats(lengths, bs, "dynamic", ml, 8),
        f"dynamic + bucketed ({args.bucket_batches} batches/window)":
            padding_stats([lengths[i] for i in order], bs, "dynamic", ml, 8),
    }
    base = rows["max_length 128 (reference)"]["padded_tokens"]
    n_batches = -(-len(lengths) // bs)
    print("\n| padding | tokens per batch | pad fraction | vs max_length |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in rows.items():
        print(f"| {name} | {s['padded_tokens'] / n_batches:.1f} | {s['pad_fraction']:.1%} | "
              f"{s['padded_tokens'] / base:.3f}× |")


if __name__ == "__main__":
    main()
