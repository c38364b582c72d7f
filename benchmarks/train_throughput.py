"""Training throughput: the reference recipe vs `distilray train`, in one invocation.

    python benchmarks/train_throughput.py [--datasets sst2 imdb] [--steps 40]

(a) reference: Hugging Face `Trainer`, padding to max_length 128, batch 16, one process;
(b) `distilray train` (Ray Train + Ray Data, dynamic padding) with 1 and 2 workers;
(c) a plain torch loop on exactly the batches distilray's 1-worker run trains on, with the same
    CPU kernels and fused AdamW, to isolate the overhead of Ray Train itself;
(b0) `distilray train`, 1 worker, with `train.cpu_kernels=false` (stock torch dropout and SDPA),
    to show what `distilray.cpu_kernels` is worth;
(a', b') (a) and (b) again with bf16 autocast (`train.mixed_precision=bf16`, Trainer `bf16=True`),
    which runs on CPUs with native bf16 (AVX512-BF16/AMX); fp32 remains the reference.
Same model (offline:minilm), machine, rows and batch 16 per optimizer step throughout.
samples/s is measured over `--steps` optimizer steps after `--warmup` steps. Ratios are
printed against (a), and (b, 1 worker) against (c). (a) runs first and last for each dataset;
the faster of the two is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distilray.config import load_config
from distilray.data import load_splits, pad_batch, tokenize_texts
from distilray.model import load_classifier, load_tokenizer, resolve_model
from distilray.train.objective import Classification
from distilray.train.plan import arrange_for_workers, build_optimizer, build_scheduler, make_plan
from distilray.train.run import read_metrics, run_training

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = ["negative", "positive"]


def subset(name: str, rows: int) -> pa.Table:
    from distilray.config import DataConfig

    return load_splits(DataConfig(dataset=str(SHARED / name), max_train_samples=rows, seed=0), 2).train


def hf_trainer_rate(table: pa.Table, steps: int, warmup: int, threads: int, bf16: bool = False) -> float:
    """Reference: transformers.Trainer, padding="max_length" (128), batch 16, 1 process."""
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(threads)
    source = resolve_model("offline:minilm")
    tok = load_tokenizer(source)
    model = load_classifier(source, LABELS, seed=0)
    ds = datasets.Dataset.from_dict({"text": table.column("text").to_pylist(),
                                     "label": table.column("label").to_pylist()})
    ds = ds.map(lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=128),
                batched=True, remove_columns=["text"])
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, learning_rate=2e-5,
                                 weight_decay=0.01, max_steps=warmup + steps, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()]).train()
    return steps * 16 / (marks[warmup + steps] - marks[warmup])


def plain_loop_rate(table: pa.Table, steps: int, warmup: int, threads: int) -> float:
    """The batches distilray's 1-worker run trains on, in a bare torch loop (no Ray)."""
    from distilray.cpu_kernels import use_cpu_training_kernels

    torch.set_num_threads(threads)
    source = resolve_model("offline:minilm")
    tok = load_tokenizer(source)
    model = load_classifier(source, LABELS, seed=0)
    use_cpu_training_kernels(model)
    plan = make_plan(table.num_rows, 16, 1, 1, 1)
    rows = arrange_for_workers(table, plan, 1, 16, seed=42)
    ids = tokenize_texts(tok, rows.column("text").to_pylist(), 128)
    labels = rows.column("label").to_pylist()
    opt = build_optimizer(model, 2e-5, 0.01)
    sched = build_scheduler(opt, "linear", plan.total_steps, 0.0)
    model.train()
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        sl = slice(step * 16, (step + 1) * 16)
        x, mask = pad_batch(ids[sl], tok.pad_token_id, "dynamic", 128, 8)
        out = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).logits
        loss = torch.nn.functional.cross_entropy(out, torch.tensor(labels[sl]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps * 16 / (time.perf_counter() - start)


def distilray_rate(data_dir: Path, workers: int, steps: int, warmup: int, storage: Path,
                   name: str, bf16: bool = False, cpu_kernels: bool = True) -> float:
    """`distilray train` on the same rows; rate from its own step log (rank 0, global)."""
    cpus = max(1, (os.cpu_count() or 2) // workers)
    cfg = load_config(None, [
        "model.name=offline:minilm", f"data.dataset={data_dir}", "data.max_eval_samples=16",
        "train.lr=2e-5", f"train.batch_size={16 // workers}", f"train.num_workers={workers}",
        f"train.cpus_per_worker={cpus}", f"train.max_steps={warmup + steps}", "train.epochs=1",
        "train.log_every_steps=1", "train.max_failures=0", f"train.storage_path={storage}",
        f"train.name={name}", f"train.cpu_kernels={str(cpu_kernels).lower()}",
        *(["train.mixed_precision=bf16"] if bf16 else [])])
    result = run_training(cfg, Classification())
    log = [r for r in read_metrics(result["run_dir"]) if r["event"] == "train"]
    first = next(r for r in log if r["step"] == warmup)
    last = next(r for r in log if r["step"] == warmup + steps)
    return steps * 16 / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sst2", "imdb"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16-autocast rows (for CPUs without native bf16)")
    args = parser.parse_args()
    threads = os.cpu_count() or 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    ray.init(address="local", num_cpus=threads + 2, log_to_driver=False)
    rows_needed = (args.steps + args.warmup + 2) * 16
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            table = subset(name, rows_needed)
            data_dir = Path(tmp) / name
            data_dir.mkdir()
            pq.write_table(table, data_dir / "train.parquet")
            pq.write_table(table.slice(0, 64), data_dir / "validation.parquet")
            first = hf_trainer_rate(table, args.steps, args.warmup, threads)
            r = {"reference (a): HF Trainer, pad 128, 1 process": first,
                 "plain torch loop, dynamic padding (c)": plain_loop_rate(table, args.steps, args.warmup, threads)}
            for workers in (1, 2):
                r[f"distilray train, {workers} worker(s) (b)"] = distilray_rate(
                    data_dir, workers, args.steps, args.warmup, Path(tmp) / "runs", f"{name}-{workers}w")
            r["distilray train, 1 worker, cpu_kernels=false (b0)"] = distilray_rate(
                data_dir, 1, args.steps, args.warmup, Path(tmp) / "runs", f"{name}-1w-stock", cpu_kernels=False)
            if not args.no_bf16:  # same runs with bf16 autocast, for the reference too
                r["HF Trainer, pad 128, bf16 autocast (a')"] = hf_trainer_rate(
                    table, args.steps, args.warmup, threads, bf16=True)
                for workers in (1, 2):
                    r[f"distilray train, {workers} worker(s), bf16 (b')"] = distilray_rate(
                        data_dir, workers, args.steps, args.warmup, Path(tmp) / "runs",
                        f"{name}-{workers}w-bf16", bf16=True)
            # the reference again, last: the faster of its two runs is the baseline, so a
            # slow moment on a shared machine cannot flatter the ratios
            again = hf_trainer_rate(table, args.steps, args.warmup, threads)
            r["reference (a): HF Trainer, pad 128, 1 process"] = max(first, again)
            r["reference (a), first and last run"] = [first, again]
            results[name] = r
    ray.shutdown()
    for name, r in results.items():
        base = r["reference (a): HF Trainer, pad 128, 1 process"]
        plain = r["plain torch loop, dynamic padding (c)"]
        print(f"\n{name}: {args.steps} steps × 16 after {args.warmup} warm-up steps, {threads} cores")
        print("| run | samples/s | vs (a) |")
        print("| --- | ---: | ---: |")
        for label, rate in r.items():
            if isinstance(rate, list):
                print(f"| {label} | {' / '.join(f'{x:.1f}' for x in rate)} | |")
                continue
            print(f"| {label} | {rate:.1f} | {rate / base:.2f}× |")
        one = r["distilray train, 1 worker(s) (b)"]
        print(f"Ray Train overhead, 1 worker vs plain loop on identical batches: {1 - one / plain:+.1%}")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
