"""In-process CPU inference engines on the same batches: torch fp32 / int8 vs ONNX Runtime.

    python benchmarks/cpu_inference.py --checkpoint DIR [--data sst2|imdb] [--threads 2] \
        [--rounds 3] [--engines torch,int8,onnx,onnx-fused,onnx-int8,onnx-int8-fused]

Every engine runs the same length-sorted forward passes (the Predictor's plan, padded to a
multiple of 8); the engines take turns pass by pass, rotating who goes first, so a machine
shared with other work slows them alike. Prints texts/s, the ratio to torch fp32 of this
invocation, label agreement with torch fp32, accuracy when the data has labels, and the
largest probability difference. `onnx` is the plain export with ORT's default (all) session
graph optimisations; `-fused` adds ORT's offline BERT fusions (onnxruntime.transformers
optimizer: EmbedLayerNorm, Attention, SkipLayerNorm, BiasGelu) before quantising.
Without --checkpoint: --model (default offline:minilm) with a random classification head
(speed only; agreement still means something, accuracy does not).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distilray.checkpoints import checkpoint_info  # noqa: E402
from distilray.data import pad_batch, tokenize_texts  # noqa: E402
from distilray.onnx_backend import OrtEngine, build_cached  # noqa: E402
from distilray.serve.predictor import PAD_MULTIPLE, Predictor, torch_int8_available  # noqa: E402

ORT_VARIANTS = {"onnx": "fp32", "onnx-fused": "fp32-fused", "onnx-int8": "int8",
                "onnx-int8-fused": "int8-fused"}


def load_data(name: str, n: int) -> tuple[list[str], np.ndarray | None]:
    import pyarrow.parquet as pq

    path = {"sst2": "sst2/validation.parquet", "imdb": "imdb/test.parquet"}[name]
    table = pq.read_table(REPO.parent / "shared" / "data" / path)
    if name == "imdb":  # a fixed sample, both classes
        idx = np.random.default_rng(0).permutation(table.num_rows)[:n]
        table = table.take(idx)
    else:
        table = table.slice(0, n)
    return table.column("text").to_pylist(), np.asarray(table.column("label").to_pylist())


def make_checkpoint(model: str, out: Path) -> Path:
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    source = resolve_model(model)
    load_classifier(source, ["negative", "positive"], seed=0).save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    return out


def engines(ckpt: Path, names: list[str], threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sha = checkpoint_info(ckpt, full_sha256=True)["sha256"]
    out = {}
    for name in names:
        if name == "torch":
            out[name] = Predictor(str(ckpt)).engine
        elif name == "int8":
            if not torch_int8_available():
                print("torch int8: not available in this torch; skipped")
                continue
            out[name] = Predictor(str(ckpt), backend="int8").engine
        else:
            t0 = time.perf_counter()
            path = build_cached(ckpt, sha, ORT_VARIANTS[name])
            print(f"{name}: {path.name} ready in {time.perf_counter() - t0:.1f} s")
            out[name] = OrtEngine(path, threads)
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--model", default="offline:minilm")
    parser.add_argument("--data", choices=["sst2", "imdb"], default="sst2")
    parser.add_argument("--texts", type=int, default=872)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--engines", default="torch,int8,onnx,onnx-fused,onnx-int8,onnx-int8-fused")
    args = parser.parse_args()
    import torch

    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.model, Path(tmp.name))
    texts, labels = load_data(args.data, args.texts)
    base = Predictor(str(ckpt), max_length=args.max_length, max_batch_tokens=args.max_batch_tokens)
    ids = tokenize_texts(base.tokenizer, texts, args.max_length)
    plan = base.chunks([len(r) for r in ids])
    batches = [pad_batch([ids[i] for i in c], base.pad_id, "dynamic", args.max_length,
                         PAD_MULTIPLE) for c in plan]
    names = args.engines.split(",")
    runs = engines(ckpt, names, args.threads)
    print(f"{ckpt} ({'checkpoint' if args.checkpoint else 'random head'}), {args.data}: "
          f"{len(texts)} texts, mean {np.mean([len(r) for r in ids]):.0f} tokens, "
          f"{len(plan)} passes, {args.threads} threads, {args.rounds} rounds, torch "
          f"{torch.__version__}")
    seconds = dict.fromkeys(runs, 0.0)
    logits = {k: np.zeros((len(texts), len(base.labels)), np.float32) for k in runs}
    order = list(runs)
    with torch.inference_mode():
        for f in runs.values():  # warm-up
            f(*batches[0])
        for r in range(args.rounds):
            for b, (chunk, (input_ids, mask)) in enumerate(zip(plan, batches, strict=True)):
                shift = (r + b) % len(order)
                for k in order[shift:] + order[:shift]:
                    t0 = time.perf_counter()
                    out = runs[k](input_ids, mask)
                    seconds[k] += time.perf_counter() - t0
                    logits[k][chunk] = out
    ref = logits.get("torch")
    print(f"{'engine':16s} {'texts/s':>8s} {'x torch':>8s} {'agree':>7s} {'accuracy':>8s} "
          f"{'max |dp|':>9s}")
    for k in runs:
        rate = len(texts) * args.rounds / seconds[k]
        ratio = seconds.get("torch", np.nan) / seconds[k]
        agree = float((logits[k].argmax(1) == ref.argmax(1)).mean()) if ref is not None else np.nan
        acc = float((logits[k].argmax(1) == labels).mean()) if args.checkpoint else np.nan
        dp = float(np.abs(softmax(logits[k]) - softmax(ref)).max()) if ref is not None else np.nan
        print(f"{k:16s} {rate:8.1f} {ratio:8.2f} {agree:7.4f} {acc:8.4f} {dp:9.2e}")
    if "int8" in runs:
        for k in ("onnx-int8", "onnx-int8-fused"):
            if k in runs:
                print(f"{k} / torch int8: {seconds['int8'] / seconds[k]:.2f}x")


if __name__ == "__main__":
    main()
