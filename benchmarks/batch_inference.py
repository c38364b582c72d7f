"""Batch inference throughput: `transformers.pipeline` vs `distilray predict` per backend.

    python benchmarks/batch_inference.py [--model offline:minilm] [--checkpoint DIR] \
        [--sst2-rows 8000] [--imdb-rows 2000] [--actors 1] [--cpus-per-actor 2] \
        [--backends torch int8 onnx onnx-int8]

(a) `transformers.pipeline("text-classification", batch_size=32)` in this process, truncating
    to max_length 128, over the rows in file order (what a user writes first);
(b) `distilray predict --input` fp32: Ray Data read → tokenise tasks → model actors, rows
    length-sorted within each actor call and padded per forward pass;
(b:<backend>) the same with each `predict.backend` (torch = fp32; int8 = torch dynamic int8;
    onnx / onnx-int8 = ONNX Runtime fp32 / int8, exported once before the timed runs).
Same checkpoint, same rows, one invocation, on SST-2 train sentences and IMDb test reviews
from ../shared/data; rows/s counts the whole job: (a) from loading the pipeline to its last
output, (b) from the call to the summary, model-actor start, file reading and writing
included (the Ray cluster is already up, as on a real one). Ratios are against (a).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def make_checkpoint(model: str, out: Path) -> Path:
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    source = resolve_model(model)
    load_classifier(source, ["negative", "positive"]).save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    return out


def run_pipeline(checkpoint: str, texts: list[str], threads: int) -> float:
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    started = time.perf_counter()  # the whole job, model load included, as for (b)
    pipe = pipeline("text-classification", model=checkpoint, device="cpu", truncation=True,
                    max_length=128)
    pipe(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - started)


def run_predict(checkpoint: str, input_file: Path, out: Path, overrides: list[str]) -> float:
    from distilray.batch.jobs import predict_files
    from distilray.config import load_config

    cfg = load_config(None, overrides)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = predict_files(cfg, checkpoint, str(input_file), str(out))
    assert summary["errors"] == 0 and summary["rows"] == summary["predicted"]
    return summary["rows"] / (time.perf_counter() - started)


def warm_onnx_cache(checkpoint: str, backends: list[str]) -> None:
    """Export (and quantise) once, untimed: a deployed model's cache exists before its jobs."""
    from distilray.serve.predictor import Predictor

    for backend in backends:
        if backend.startswith("onnx"):
            Predictor(checkpoint, max_length=128, backend=backend).predict(["warm the cache"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:minilm")
    parser.add_argument("--checkpoint", help="use this checkpoint instead of --model's")
    parser.add_argument("--sst2-rows", type=int, default=8000)
    parser.add_argument("--imdb-rows", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=1, help="model actors (predict.max_actors)")
    parser.add_argument("--cpus-per-actor", type=float, default=2.0)
    parser.add_argument("--backends", nargs="+", default=["torch", "int8", "onnx", "onnx-int8"])
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    checkpoint = args.checkpoint or str(make_checkpoint(args.model, work / "ckpt"))
    sets = {"SST-2": pq.read_table(DATA / "sst2" / "train.parquet").slice(0, args.sst2_rows),
            "IMDb": pq.read_table(DATA / "imdb" / "test.parquet").slice(0, args.imdb_rows)}
    threads = int(args.cpus_per_actor * args.actors)
    ray.init(address="local", num_cpus=max(threads + 1, 3), include_dashboard=False)
    base = [f"predict.max_actors={args.actors}", f"predict.min_actors={args.actors}",
            f"predict.cpus_per_actor={args.cpus_per_actor}"]
    print(f"checkpoint {checkpoint}; (a) pipeline with {threads} torch threads; "
          f"(b) {args.actors} actor(s) × {args.cpus_per_actor:g} CPUs")
    warm_onnx_cache(checkpoint, args.backends)
    print(f"{'data':<6} {'rows':>5} {'(a) rows/s':>11} "
          + " ".join(f"{'(b:' + b + ')':>16} {'ratio':>6}" for b in args.backends))
    for name, table in sets.items():
        path = work / f"{name}.parquet"
        pq.write_table(table, path)
        a = run_pipeline(checkpoint, table.column("text").to_pylist(), threads)
        cells = []
        for backend in args.backends:
            b = run_predict(checkpoint, path, work / f"out-{backend}",
                            [*base, f"predict.backend={backend}"])
            cells.append(f"{b:>16.1f} {b / a:>5.2f}×")
        print(f"{name:<6} {table.num_rows:>5} {a:>11.1f} " + " ".join(cells), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
