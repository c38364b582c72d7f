"""One table for a lent GPU machine: training, serving and batch inference per precision.

    python benchmarks/gpu_check.py            # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --smoke    # tiny model on CPU, seconds: keeps this from rotting

DistilBERT-base shape (6 layers, 768 wide, 12 heads) with seeded random weights (the Hub is
not reachable there) and IMDb-length inputs (128 tokens, random words of the real vocabulary):
1. training samples/s and model FLOPs utilisation, 1 worker, fp32 / bf16 / fp16 autocast
   (the loop of `distilray train`'s workers: AdamW, grad clipping, a GradScaler for fp16);
2. `distilray serve` (split topology, one GPU replica) requests/s and p99 at concurrency 32
   and 128 for serve.dtype float32 / float16 / bfloat16, label agreement with float32;
3. batch inference rows/s in bfloat16 (the Predictor every `distilray predict` actor runs).
--smoke: the tiny model, 16 tokens, few steps, float32 serving and fp32/bf16 training on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

BASE = dict(vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768,
            hidden_dim=3072)
TINY = dict(vocab_size=30522, max_position_embeddings=512, n_layers=2, n_heads=2, dim=64,
            hidden_dim=128)
# Dense peak FLOP/s by precision (vendor datasheets, SXM parts); fp32 without TF32.
PEAKS = {"H200": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
         "H100": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
         "A100": {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12},
         "L4": {"fp32": 30e12, "bf16": 121e12, "fp16": 121e12},
         "A10": {"fp32": 31e12, "bf16": 125e12, "fp16": 125e12}}


def make_checkpoint(out: Path, shape: dict, max_length: int) -> Path:
    """Seeded random DistilBERT classifier + the real uncased tokenizer, as a checkpoint."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from distilray.model import load_tokenizer, resolve_model

    torch.manual_seed(0)
    cfg = DistilBertConfig(**shape, id2label={0: "negative", 1: "positive"},
                           label2id={"negative": 0, "positive": 1})
    DistilBertForSequenceClassification(cfg).save_pretrained(out)
    load_tokenizer(resolve_model("tiny")).save_pretrained(out)
    (out / "distilray.json").write_text(json.dumps({"run_name": "gpu-check", "step": 0,
                                                    "model_name": "random", "max_length": max_length}))
    return out


def random_texts(ckpt: Path, n: int, tokens: int, seed: int = 0) -> list[str]:
    """Texts of random real words, long enough to fill `tokens` tokens."""
    from transformers import AutoTokenizer

    vocab = [w for w in AutoTokenizer.from_pretrained(str(ckpt)).get_vocab() if w.isalpha()]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, tokens)) for _ in range(n)]


def flops_per_sample(shape: dict, seq: int) -> float:
    """Training FLOPs per sequence: 6 × non-embedding parameters × tokens + attention scores."""
    d, h, layers = shape["dim"], shape["hidden_dim"], shape["n_layers"]
    params = layers * (4 * d * d + 2 * d * h)
    return 6 * params * seq + layers * 12 * seq * seq * d


def train_rate(ckpt: Path, shape: dict, device: str, precision: str, seq: int, batch: int,
               steps: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(ckpt)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        (scaler.step(opt), scaler.update()) if scaler is not None else opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = batch * steps / (time.perf_counter() - t0)
    peak = next((p[precision] for name, p in PEAKS.items() if name in device_name(device)), None)
    mfu = rate * flops_per_sample(shape, seq) / peak if peak else float("nan")
    return {"part": "train", "variant": precision, "samples_per_s": rate, "mfu": mfu}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def serve_rates(ckpt: Path, dtype: str, gpu: bool, texts: list[str], concurrencies: list[int],
                requests_per_level: int, port: int, max_length: int) -> tuple[list[dict], list[str]]:
    """`distilray serve` with serve.dtype: rows per concurrency, and its labels of `texts`."""
    from serve_throughput import http_level, summarize

    from distilray.client import classify
    from distilray.config import load_config
    from distilray.serve.lifecycle import shutdown_server, start_server

    cfg = load_config(None, [f"serve.port={port}", f"serve.app_name=gpu-check-{dtype}",
                             f"serve.route_prefix=/{dtype}", f"serve.dtype={dtype}",
                             "serve.backend=torch",  # torch's dtypes, compared with its fp32
                             f"serve.max_length={max_length}", "serve.min_replicas=1",
                             "serve.max_replicas=1", "serve.max_batch_size=128",
                             f"serve.num_gpus={1 if gpu else 0}",
                             f"serve.num_cpus={1 if gpu else 0.5}", "serve.access_log=false"])
    url = start_server(cfg, str(ckpt))
    try:
        labels = [p["label"] for p in classify(url, texts, batch_size=64)]
        rows = []
        for conc in concurrencies:
            lat, elapsed, errors = asyncio.run(http_level(f"{url}/v1/classify", texts, conc,
                                                          requests_per_level, 60.0))
            rows.append({"part": "serve", "variant": f"{dtype} c={conc}",
                         **summarize(dtype, conc, lat, elapsed, errors)})
    finally:
        shutdown_server(cfg)
    return rows, labels


def batch_rate(ckpt: Path, device: str, dtype: str, texts: list[str], max_length: int) -> dict:
    from distilray.serve.predictor import Predictor

    pred = Predictor(str(ckpt), max_length=max_length, device=device, dtype=dtype)
    pred.logits(texts[:64])
    sync(device)
    t0 = time.perf_counter()
    pred.logits(texts)
    sync(device)
    return {"part": "batch", "variant": dtype, "rows_per_s": len(texts) / (time.perf_counter() - t0)}


def run(smoke: bool, port: int) -> list[dict]:
    import torch

    gpu = torch.cuda.is_available() and not smoke
    device = "cuda" if gpu else "cpu"
    shape, seq = (TINY, 16) if smoke else (BASE, 128)
    tmp = tempfile.TemporaryDirectory()
    ckpt = make_checkpoint(Path(tmp.name), shape, seq)
    rows = []
    precisions = ["fp32", "bf16"] + (["fp16"] if gpu else [])
    for p in precisions:
        rows.append(train_rate(ckpt, shape, device, p, seq, 8 if smoke else 32, 3 if smoke else 30))
    texts = random_texts(ckpt, 64 if smoke else 512, seq)
    dtypes = ["float32", "float16", "bfloat16"] if gpu else ["float32"]
    labels = {}
    for dtype in dtypes:
        levels, labels[dtype] = serve_rates(ckpt, dtype, gpu, texts, [4] if smoke else [32, 128],
                                            32 if smoke else 2000, port, seq)
        agree = float(np.mean([a == b for a, b in zip(labels[dtype], labels["float32"],
                                                       strict=True)]))
        rows += [{**r, "agreement": agree} for r in levels]
    rows.append(batch_rate(ckpt, device, "bfloat16" if gpu else "float32",
                           texts * (1 if smoke else 8), seq))
    return rows


def table(rows: list[dict], device: str) -> str:
    out = [f"gpu_check on {device}", f"{'part':6s} {'variant':16s} {'rate':>10s} {'unit':10s} "
           f"{'p99 ms':>8s} {'MFU':>6s} {'agree':>6s}"]
    for r in rows:
        rate, unit = next((r[k], u) for k, u in (("samples_per_s", "samples/s"), ("rps", "req/s"),
                                                 ("rows_per_s", "rows/s")) if k in r)
        out.append(f"{r['part']:6s} {r['variant']:16s} {rate:10.1f} {unit:10s} "
                   f"{r.get('p99', float('nan')):8.1f} {r.get('mfu', float('nan')):6.1%} "
                   f"{r.get('agreement', float('nan')):6.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.smoke, args.port)
    import torch

    print(table(rows, device_name("cuda" if torch.cuda.is_available() and not args.smoke
                                  else "cpu")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
