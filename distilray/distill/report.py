"""Teacher vs student: accuracy, macro-F1, size and CPU speed, measured side by side.

`write_distill_report` writes `distill_report.md` and `distill_report.json` into the run
directory after `distilray distill` trained the student; the CLI prints the Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilray.checkpoints import checkpoint_size
from distilray.config import Config
from distilray.distill.student import model_depth
from distilray.errors import CheckpointError

REPORT_FILE = "distill_report.md"
REPORT_JSON = "distill_report.json"
REPORT_BATCH = 32
REPORT_THREADS = 1


@dataclass(frozen=True)
class ModelScore:
    """One row of the report: quality, size and CPU speed of a checkpoint."""

    name: str
    path: str
    accuracy: float
    macro_f1: float
    parameters: int
    layers: int
    size_bytes: int
    samples_per_s: float


def measure_checkpoints(checkpoints: dict[str, str], texts: list[str], labels: list[int],
                        max_length: int = 128, batch_size: int = 32, threads: int = 1,
                        repeats: int = 5) -> list[ModelScore]:
    """Accuracy, macro-F1 and CPU samples/s of each checkpoint on the same batches.

    All models read identical pre-tokenised, dynamically padded batches (one shared tokenizer:
    student and teacher share the vocabulary). Timed passes are interleaved model by model
    and the fastest of `repeats` counts, so load from other processes affects all alike.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from distilray.data import encode_for_model
    from distilray.metrics import confusion_counts, metrics_from_confusion
    from distilray.model import ModelSource, load_tokenizer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = next(iter(checkpoints.values()))
        tokenizer = load_tokenizer(ModelSource(first, "local", first))
        batches = []
        for i in range(0, len(texts), batch_size):
            enc = encode_for_model(tokenizer, texts[i: i + batch_size], max_length)
            batches.append((torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])))
        models = {name: AutoModelForSequenceClassification.from_pretrained(path).eval()
                  for name, path in checkpoints.items()}
        num_labels = next(iter(models.values())).config.num_labels
        quality = {}
        with torch.inference_mode():
            for name, model in models.items():  # untimed pass: predictions, and warm-up
                preds = np.concatenate([model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
                                        for ids, mask in batches])
                quality[name] = metrics_from_confusion(confusion_counts(preds, np.asarray(labels), num_labels))
            best = fastest_passes(models, batches, repeats)
    finally:
        torch.set_num_threads(previous_threads)
    return [ModelScore(name=name, path=str(checkpoints[name]),
                       accuracy=quality[name]["eval_accuracy"], macro_f1=quality[name]["eval_macro_f1"],
                       parameters=sum(p.numel() for p in model.parameters()),
                       layers=model_depth(model.config), size_bytes=checkpoint_size(checkpoints[name]),
                       samples_per_s=len(texts) / best[name])
            for name, model in models.items()]


def fastest_passes(models: dict[str, Any], batches: list, repeats: int) -> dict[str, float]:
    """Seconds of each model's fastest pass over `batches`, passes interleaved (ABBA…)."""
    best = dict.fromkeys(models, float("inf"))
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            start = time.perf_counter()
            for ids, mask in batches:
                models[name](input_ids=ids, attention_mask=mask)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def render_report(scores: list[ModelScore], notes: list[str] | None = None) -> str:
    """Markdown table; the first row is the teacher, the others are compared to it."""
    teacher = scores[0]
    lines = ["| model | layers | accuracy | macro-F1 | retention (acc) | parameters | checkpoint MB "
             "| CPU samples/s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in scores:
        lines.append(
            f"| {s.name} | {s.layers} | {s.accuracy:.4f} | {s.macro_f1:.4f} | "
            f"{100 * s.accuracy / teacher.accuracy:.1f}% | {s.parameters / 1e6:.2f}M | "
            f"{s.size_bytes / 2**20:.1f} | {s.samples_per_s:.1f} | "
            f"{s.samples_per_s / teacher.samples_per_s:.2f}× |")
    return "\n".join(lines + [""] + [f"- {n}" for n in (notes or [])]) + "\n"


def retention(scores: list[ModelScore]) -> dict[str, dict[str, float]]:
    """Per non-teacher row: accuracy retention and speed-up against the first (teacher) row."""
    teacher = scores[0]
    return {s.name: {"accuracy_retention": s.accuracy / teacher.accuracy,
                     "macro_f1_retention": s.macro_f1 / teacher.macro_f1 if teacher.macro_f1 else 0.0,
                     "speedup": s.samples_per_s / teacher.samples_per_s,
                     "size_ratio": s.size_bytes / teacher.size_bytes}
            for s in scores[1:]}


def write_distill_report(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    """Measure teacher and student of a finished `run_distillation` and write the report files.

    Returns the student checkpoint, and the report's path and text (both None when the run
    directory is not local, where the report is skipped).
    """
    from distilray.data import load_splits
    from distilray.distill.teacher import resolve_teacher_dir
    from distilray.files import is_uri

    student = summary.get("best_checkpoint") or summary.get("latest_checkpoint")
    if not student:
        raise CheckpointError(f"run '{summary['run_name']}' wrote no checkpoint; see {summary['run_dir']}")
    if is_uri(summary["run_dir"]):
        return {"student_checkpoint": student, "report": None, "text": None}
    teacher = str(resolve_teacher_dir(cfg.distill.teacher or ""))
    ev = load_splits(cfg.data, cfg.model.num_labels).eval
    scores = measure_checkpoints({"teacher": teacher, "student": student},
                                 ev.column("text").to_pylist(), ev.column("label").to_pylist(),
                                 cfg.data.max_length, batch_size=REPORT_BATCH, threads=REPORT_THREADS)
    notes = [f"{len(ev)} validation sentences ({cfg.data.dataset}); accuracy from the checkpoints "
             "loaded with transformers, the student's best by eval_accuracy",
             f"CPU samples/s: batches of {REPORT_BATCH}, torch threads {REPORT_THREADS}, fastest of 5 "
             "interleaved passes in the same process",
             "checkpoint MB: the files a server loads (model.safetensors, config, tokenizer)"]
    d = cfg.distill
    text = (f"# Distillation report: {summary['run_name']}\n\n"
            f"Student `{d.student}` from teacher `{teacher}`; T={d.temperature}, alpha={d.alpha}, "
            f"cosine_weight={d.cosine_weight}, teacher logits {d.teacher_logits}.\n\n"
            + render_report(scores, notes))
    path = Path(summary["run_dir"]) / REPORT_FILE
    path.write_text(text)
    (Path(summary["run_dir"]) / REPORT_JSON).write_text(json.dumps(
        {"scores": [dataclasses.asdict(s) for s in scores], "retention": retention(scores)}, indent=2))
    return {"student_checkpoint": student, "report": str(path), "text": text}
