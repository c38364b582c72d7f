"""What `distilray.cpu_kernels` and fused AdamW are worth, measured interleaved in one process.

    python benchmarks/cpu_kernels.py [--dataset imdb] [--rounds 8] [--steps-per-round 4]

Variants of one fp32 training step (offline:minilm, batch 16, max_length 128, 2e-5 AdamW,
clipping) on the same batches: stock torch (dropout via bernoulli_, SDPA's math path for
attention dropout, for-loop AdamW), fused AdamW only, CPU kernels only, and both. The
variants take turns in rounds of a few steps, so load from anything else on the machine
falls on all of them alike; the first round is warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import LABELS, subset  # noqa: E402

from distilray.cpu_kernels import use_cpu_training_kernels  # noqa: E402
from distilray.data import pad_batch, tokenize_texts  # noqa: E402
from distilray.model import load_classifier, load_tokenizer, resolve_model  # noqa: E402
from distilray.train.plan import param_groups  # noqa: E402

VARIANTS = {"stock torch": (False, False), "fused AdamW": (False, True),
            "cpu_kernels": (True, False), "cpu_kernels + fused AdamW (distilray)": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="imdb")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 2)
    source = resolve_model("offline:minilm")
    tok = load_tokenizer(source)
    table = subset(args.dataset, 320)
    ids = tokenize_texts(tok, table.column("text").to_pylist(), 128)
    labels = table.column("label").to_pylist()
    runs = {}
    for name, (kernels, fused) in VARIANTS.items():
        model = load_classifier(source, LABELS, seed=0).train()
        if kernels:
            use_cpu_training_kernels(model)
        runs[name] = (model, torch.optim.AdamW(param_groups(model, 0.01), lr=2e-5, fused=fused))
    seconds = dict.fromkeys(VARIANTS, 0.0)
    steps = dict.fromkeys(VARIANTS, 0)
    tokens = 0
    for rnd in range(args.rounds + 1):
        for name, (model, opt) in runs.items():
            for i in range(args.steps_per_round):
                b = (rnd * args.steps_per_round + i) % (len(ids) // 16)
                x, mask = pad_batch(ids[b * 16:(b + 1) * 16], tok.pad_token_id, "dynamic", 128, 8)
                t0 = time.perf_counter()
                logits = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[b * 16:(b + 1) * 16]))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if rnd > 0:
                    seconds[name] += time.perf_counter() - t0
                    steps[name] += 1
                    tokens += x.size if name == "stock torch" else 0
    print(f"{args.dataset}: {args.rounds} rounds × {args.steps_per_round} steps per variant, batch 16, "
          f"{tokens / max(1, steps['stock torch']) / 16:.0f} tokens per row, {torch.get_num_threads()} threads")
    print("| variant | samples/s | vs stock |")
    print("| --- | ---: | ---: |")
    base = steps["stock torch"] * 16 / seconds["stock torch"]
    for name in VARIANTS:
        rate = steps[name] * 16 / seconds[name]
        print(f"| {name} | {rate:.1f} | {rate / base:.3f}× |")


if __name__ == "__main__":
    main()
