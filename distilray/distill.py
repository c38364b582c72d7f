"""`distilray distill`: a fine-tuned teacher trains a smaller, faster student on Ray Train.

Distillation reuses `distilray train` whole (validation, per-worker ordered shards, Ray Data
tokenisation, checkpoints, restarts); what differs lives here:

- the student: `layers:K` is a DistilBERT with K of the teacher's layers (every other one
  for K = depth/2, as the DistilBERT paper initialises it, keeping the top layer), the
  teacher's embeddings and classifier head; or any model the resolver knows, sharing the teacher's vocabulary;
- the loss (`distilray.losses`): alpha · T² · KL(teacher ‖ student at T) + (1 − alpha) · CE;
- teacher logits: computed on each worker by a frozen teacher (`on_the_fly`), or once by
  Ray Data batch inference, cached on disk, and carried with the training rows (`precomputed`);
- a `distill_report.md`: teacher vs student accuracy, macro-F1, size and CPU speed, measured
  in the same process on the same batches.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distilray.checkpoints import WEIGHT_FILES, checkpoint_size, resolve_checkpoint_dir
from distilray.config import Config, apply_overrides
from distilray.errors import CheckpointError, ConfigError, ModelError
from distilray.files import sha256_file, write_parquet_atomic
from distilray.losses import cosine_hidden_loss, distillation_loss

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distilray.train import PreparedRun

__all__ = ["distillation_loss", "cosine_hidden_loss", "distill_main", "build_student",
           "load_teacher", "check_distill_config", "student_layer_map", "init_student_from_teacher"]

log = logging.getLogger(__name__)

LAYERS_PREFIX = "layers:"
REPORT_FILE = "distill_report.md"
REPORT_JSON = "distill_report.json"
LOGITS_CACHE_DIR = ".teacher-logits"
# Files a server loads from a checkpoint; training_state.pt (optimizer moments) is not one.
_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?transformer\.layer\.)(?P<index>\d+)\.(?P<rest>.+)$")


# --------------------------------------------------------------------------- student spec


@dataclass(frozen=True)
class StudentSpec:
    """`layers:K` (K teacher layers) or a model name for the resolver."""

    layers: int | None = None
    model: str | None = None


def parse_student(spec: str) -> StudentSpec:
    spec = spec.strip()
    if spec.startswith(LAYERS_PREFIX):
        text = spec.removeprefix(LAYERS_PREFIX)
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"distill.student={spec!r}: K in layers:K must be a positive integer, "
                              "e.g. layers:3")
        return StudentSpec(layers=int(text))
    if not spec:
        raise ConfigError("distill.student is empty; use layers:K or a model name (e.g. tiny)")
    return StudentSpec(model=spec)


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer copied into each student layer: the top one of K equal groups, (i+1)·N//K − 1.

    For K = N/2 that is one layer out of two, as the DistilBERT paper initialises its student,
    taking the second of each pair so the teacher's last layer — the one its copied classifier
    head reads — is kept: 6 → 3 copies teacher layers [1, 3, 5]. Before any training that
    student scores 0.761 on SST-2 validation against 0.516 (chance) for [0, 2, 4], with a
    0.841 teacher. K = N is the identity; 6 → 2 copies [2, 5], 6 → 4 copies [0, 2, 3, 5].
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(f"distill.student=layers:{student_layers}: the teacher has "
                          f"{teacher_layers} layers; choose K between 1 and {teacher_layers}")
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def init_student_from_teacher(teacher_state: dict[str, torch.Tensor],
                              layer_map: list[int]) -> dict[str, torch.Tensor]:
    """Student state dict: teacher layer layer_map[i] becomes layer i; everything else is copied.

    Embeddings, the classifier head (pre_classifier, classifier) and any other non-layer
    weight are taken as they are; every mapped layer must exist with the same parameter names.
    """
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    prefix = None
    for key, value in teacher_state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = value.clone()
            continue
        prefix = match["prefix"]
        per_layer.setdefault(int(match["index"]), {})[match["rest"]] = value
    if prefix is None:
        raise ModelError("teacher weights have no 'transformer.layer.N.*' keys: not a DistilBERT")
    names = set(per_layer[0])
    for index, params in per_layer.items():
        if set(params) != names:
            raise ModelError(f"teacher layer {index} has different parameters than layer 0")
    for student_index, teacher_index in enumerate(layer_map):
        if teacher_index not in per_layer:
            raise ModelError(f"teacher has no layer {teacher_index} (layers: {sorted(per_layer)})")
        for rest, value in per_layer[teacher_index].items():
            out[f"{prefix}{student_index}.{rest}"] = value.clone()
    return out


# --------------------------------------------------------------------------- teacher


def resolve_teacher_dir(teacher: str) -> Path:
    """A checkpoint directory, or a `distilray train` run directory (its best checkpoint)."""
    path = Path(teacher).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"distill.teacher={teacher!r}: no such directory; pass --teacher with a "
                              "checkpoint written by distilray train (e.g. RUN_DIR/checkpoint-step…)")
    path = resolve_checkpoint_dir(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"distill.teacher={teacher!r} has no config.json: not a Hugging Face "
                              "checkpoint (nor a run directory with a best checkpoint in result.json)")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise CheckpointError(f"distill.teacher={teacher!r} has no model.safetensors: the checkpoint "
                              "is incomplete; point to a finished checkpoint")
    return path.resolve()


def _teacher_config(teacher_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(teacher_dir))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the teacher's config in {teacher_dir}: {exc}") from None


def _depth(config) -> int:
    return int(getattr(config, "n_layers", None) or config.num_hidden_layers)


def _width(config) -> int:
    return int(getattr(config, "dim", None) or config.hidden_size)


def load_teacher(cfg: Config) -> PreTrainedModel:
    """The frozen teacher: eval mode (no dropout), no gradients."""
    from transformers import AutoModelForSequenceClassification

    teacher_dir = resolve_teacher_dir(cfg.distill.teacher or "")
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_student(cfg: Config) -> PreTrainedModel:
    """The model a distillation worker trains (same on every worker: no random init for layers:K)."""
    import torch
    from transformers import DistilBertForSequenceClassification

    from distilray.model import load_classifier, resolve_model, set_dropout

    spec = parse_student(cfg.distill.student)
    if spec.layers is not None:
        teacher = load_teacher(cfg)
        if teacher.config.model_type != "distilbert":
            raise ModelError(f"distill.student=layers:{spec.layers} copies DistilBERT layers, but the "
                             f"teacher is a {teacher.config.model_type!r}; name a student model instead")
        layer_map = student_layer_map(_depth(teacher.config), spec.layers)
        config = copy.deepcopy(teacher.config)
        config.n_layers = spec.layers
        torch.manual_seed(cfg.train.seed)
        student = DistilBertForSequenceClassification(config)
        student.load_state_dict(init_student_from_teacher(teacher.state_dict(), layer_map), strict=True)
        log.info("student: %d-layer DistilBERT from teacher layers %s", spec.layers, layer_map)
    else:
        student = load_classifier(resolve_model(spec.model or "", cfg.model.cache_dir),
                                  cfg.model.label_names, seed=cfg.train.seed)
    if cfg.model.dropout is not None:
        set_dropout(student, cfg.model.dropout)
    student.train()
    return student


def check_distill_config(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse before any work: missing teacher, K too large, different vocabularies or labels."""
    from transformers import AutoConfig

    from distilray.model import ModelSource, load_tokenizer, resolve_model

    d = cfg.distill
    spec = parse_student(d.student)
    problems = []
    if d.cosine_weight > 0 and d.teacher_logits != "on_the_fly":
        problems.append(f"distill.cosine_weight={d.cosine_weight} needs the teacher's hidden states, "
                        "which only distill.teacher_logits=on_the_fly computes; set one or the other")
    teacher_dir = resolve_teacher_dir(d.teacher or "")
    tcfg = _teacher_config(teacher_dir)
    if spec.layers is not None:
        if tcfg.model_type != "distilbert":
            raise ModelError(f"distill.student=layers:{spec.layers} copies DistilBERT layers, but the "
                             f"teacher {teacher_dir} is a {tcfg.model_type!r} model; name a student "
                             "model instead (distill.student=<model>)")
        if spec.layers > _depth(tcfg):
            problems.append(f"distill.student=layers:{spec.layers}: the teacher has {_depth(tcfg)} "
                            f"layers; choose K between 1 and {_depth(tcfg)}")
    if problems:
        raise ConfigError(problems)

    teacher_labels = [tcfg.id2label[i] for i in sorted(tcfg.id2label)] if tcfg.id2label else []
    if len(teacher_labels) != cfg.model.num_labels or teacher_labels != list(cfg.model.label_names):
        raise ModelError(f"the teacher {teacher_dir} predicts labels {teacher_labels} but the config "
                         f"has model.label_names={list(cfg.model.label_names)}; set "
                         f"model.num_labels={len(teacher_labels)} and model.label_names to the teacher's")

    teacher_vocab = load_tokenizer(ModelSource(str(teacher_dir), "local", str(teacher_dir))).get_vocab()
    if tokenizer.get_vocab() != teacher_vocab:
        raise ModelError(f"model.name={cfg.model.name!r} tokenises with a different vocabulary than the "
                         f"teacher {teacher_dir}; distillation feeds both the same token ids, so set "
                         "model.name to the teacher's directory (distilray distill does)")
    if spec.model is not None:
        source = resolve_model(spec.model, cfg.model.cache_dir)
        student_vocab = load_tokenizer(source).get_vocab()
        if student_vocab != teacher_vocab:
            raise ModelError(f"distill.student={spec.model!r} has a different vocabulary "
                             f"({len(student_vocab)} tokens) than the teacher ({len(teacher_vocab)} "
                             "tokens); both must read the same token ids: pick a student with the "
                             "teacher's tokenizer, or layers:K")
        scfg = AutoConfig.from_pretrained(source.path)
        has_head = any(a.endswith("ForSequenceClassification") for a in (scfg.architectures or []))
        student_labels = [scfg.id2label[i] for i in sorted(scfg.id2label)] if scfg.id2label else []
        if has_head and student_labels != teacher_labels:
            raise ModelError(f"distill.student={spec.model!r} already classifies {student_labels}, "
                             f"the teacher {teacher_labels}; use a student without a classification "
                             "head or with the teacher's labels")
        if d.cosine_weight > 0 and _width(scfg) != _width(tcfg):
            raise ConfigError(f"distill.cosine_weight={d.cosine_weight} compares hidden states, but the "
                              f"student is {_width(scfg)} wide and the teacher {_width(tcfg)}; "
                              "set distill.cosine_weight=0")


def distill_step_loss(cfg: Config, student_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                      teacher: PreTrainedModel | None,
                      student_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The worker's loss for one batch: KD (+ cosine on last hidden states when configured)."""
    import torch
    import torch.nn.functional as F

    d = cfg.distill
    teacher_hidden = None
    if d.alpha == 0.0 and not (student_hidden is not None and d.cosine_weight > 0):
        return F.cross_entropy(student_logits, batch["labels"])  # no soft term: skip the teacher
    if teacher is not None:
        with torch.inference_mode():
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=student_hidden is not None)
        teacher_logits = out.logits.float().clone()  # leave inference mode: autograd may see it
        if student_hidden is not None:
            teacher_hidden = out.hidden_states[-1].float().clone()
    else:
        teacher_logits = batch["teacher_logits"]
    loss = distillation_loss(student_logits, teacher_logits, batch["labels"], d.temperature, d.alpha)
    if student_hidden is not None and d.cosine_weight > 0:
        if teacher_hidden is None:
            raise ConfigError("distill.cosine_weight > 0 needs distill.teacher_logits=on_the_fly")
        loss = loss + d.cosine_weight * cosine_hidden_loss(student_hidden.float(), teacher_hidden,
                                                           batch["attention_mask"])
    return loss


# --------------------------------------------------------------------------- precomputed logits


class TeacherLogits:
    """Ray Data actor: tokenise a batch of texts and return the teacher's logits per row."""

    def __init__(self, teacher_dir: str, max_length: int, threads: int = 1):
        import torch
        from transformers import AutoModelForSequenceClassification

        from distilray.model import ModelSource, load_tokenizer

        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(ModelSource(teacher_dir, "local", teacher_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
        self.max_length = max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import torch

        from distilray.data import encode_for_model

        enc = encode_for_model(self.tokenizer, batch.column("text").to_pylist(), self.max_length)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.from_numpy(enc["input_ids"]),
                                attention_mask=torch.from_numpy(enc["attention_mask"])).logits
        logits = logits.float().numpy().astype(np.float32)
        return pa.table({"row": batch.column("row"),
                         "teacher_logits": pa.array(list(logits), pa.list_(pa.float32()))})


def _logits_cache_key(teacher_dir: Path, texts: list[str], max_length: int) -> str:

    digest = hashlib.sha256()
    weights = teacher_dir / "model.safetensors"
    digest.update((sha256_file(weights) if weights.exists() else str(teacher_dir)).encode())
    digest.update(f"|{max_length}|{len(texts)}|".encode())
    digest.update("\x00".join(texts).encode())
    return digest.hexdigest()[:24]


def precompute_teacher_logits(run: PreparedRun, batch_size: int = 64) -> pa.Table:
    """The teacher's logits for every training row (in row order), by Ray Data batch inference.

    Cached as parquet under `<storage>/.teacher-logits/`, keyed by the teacher's weights, the
    training texts and max_length: a resumed run or a Tune trial reuses them.
    """
    import pyarrow.parquet as pq
    import ray.data

    from distilray.runtime import is_uri, quiet_ray_data

    cfg = run.cfg
    teacher_dir = resolve_teacher_dir(cfg.distill.teacher or "")
    texts = run.splits.train.column("text").to_pylist()
    cache = None
    if not is_uri(run.storage):
        key = _logits_cache_key(teacher_dir, texts, cfg.data.max_length)
        cache = Path(run.storage) / LOGITS_CACHE_DIR / f"{key}.parquet"
        if cache.exists():
            table = pq.read_table(cache)
            if table.num_rows == run.splits.train.num_rows:
                log.info("teacher logits: %d rows from cache %s", table.num_rows, cache)
                return table.select(["teacher_logits"])
    quiet_ray_data()
    started = time.time()
    # Longest first, so each batch pads little and the slowest batches start early; `row`
    # restores the training order afterwards.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    rows = pa.table({"row": pa.array(order, pa.int64()),
                     "text": pa.array([texts[i] for i in order], pa.string())})
    actors = max(1, cfg.train.num_workers)
    ds = ray.data.from_arrow(rows).map_batches(
        TeacherLogits, batch_format="pyarrow", batch_size=batch_size,
        fn_constructor_kwargs={"teacher_dir": str(teacher_dir), "max_length": cfg.data.max_length,
                               "threads": max(1, int(cfg.train.cpus_per_worker))},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=cfg.train.cpus_per_worker)
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("row")
    if out.num_rows != len(texts) or out.column("row").to_pylist() != list(range(len(texts))):
        raise AssertionError("teacher inference lost or duplicated rows")
    table = out.select(["teacher_logits"])
    log.info("teacher logits: %d rows by %d Ray Data actors in %.1fs", table.num_rows, actors,
             time.time() - started)
    if cache is not None:
        write_parquet_atomic(table, cache)
    return table


# --------------------------------------------------------------------------- measuring


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
            best = dict.fromkeys(models, float("inf"))
            for r in range(repeats):
                order = list(models) if r % 2 == 0 else list(reversed(models))
                for name in order:
                    start = time.perf_counter()
                    for ids, mask in batches:
                        models[name](input_ids=ids, attention_mask=mask)
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return [ModelScore(name=name, path=str(checkpoints[name]),
                       accuracy=quality[name]["eval_accuracy"], macro_f1=quality[name]["eval_macro_f1"],
                       parameters=sum(p.numel() for p in model.parameters()),
                       layers=_depth(model.config), size_bytes=checkpoint_size(checkpoints[name]),
                       samples_per_s=len(texts) / best[name])
            for name, model in models.items()]


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


# --------------------------------------------------------------------------- driver


def distill_config(cfg: Config, args: argparse.Namespace | None = None) -> Config:
    """Apply --teacher/--student/--workers/--name, and tokenise with the teacher's vocabulary."""
    overrides: dict[str, Any] = {}
    if args is not None:
        for flag, key in (("teacher", "distill.teacher"), ("student", "distill.student"),
                          ("workers", "train.num_workers"), ("name", "train.name")):
            value = getattr(args, flag, None)
            if value is not None:
                overrides[key] = value
    teacher = overrides.get("distill.teacher", cfg.distill.teacher)
    if not teacher:
        raise ConfigError("distill.teacher is not set; pass --teacher with a checkpoint written by "
                          "distilray train")
    overrides["distill.teacher"] = str(resolve_teacher_dir(teacher))
    overrides["model.name"] = overrides["distill.teacher"]
    return apply_overrides(cfg, overrides)


def run_distillation(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Validate, precompute teacher logits when configured, and fit the student on Ray Train."""
    from distilray.runtime import connect_ray
    from distilray.train import fit, preflight, prepare_run

    run = prepare_run(cfg)  # sets model.name to the teacher, runs check_distill_config
    connect_ray(min_cpus=run.cfg.train.num_workers * run.cfg.train.cpus_per_worker)
    preflight(run.cfg, run.storage)
    extra = None
    if run.cfg.distill.teacher_logits == "precomputed":
        extra = precompute_teacher_logits(run, batch_size=max(32, run.cfg.train.batch_size * 4))
    return fit(run, extra_train_columns=extra, callbacks=callbacks)


def write_report(run_dir: str | Path, scores: list[ModelScore], cfg: Config, notes: list[str]) -> Path:
    header = (f"# Distillation report: {cfg.train.name}\n\n"
              f"Student `{cfg.distill.student}` from teacher `{cfg.distill.teacher}`; "
              f"T={cfg.distill.temperature}, alpha={cfg.distill.alpha}, "
              f"cosine_weight={cfg.distill.cosine_weight}, teacher logits {cfg.distill.teacher_logits}.\n\n")
    path = Path(run_dir) / REPORT_FILE
    path.write_text(header + render_report(scores, notes))
    (Path(run_dir) / REPORT_JSON).write_text(json.dumps(
        {"scores": [dataclasses.asdict(s) for s in scores], "retention": retention(scores)}, indent=2))
    return path


def distill_main(cfg: Config, args: argparse.Namespace | None = None) -> int:
    """`distilray distill`: train the student, then compare it with the teacher in one report."""
    from distilray.data import load_splits
    from distilray.runtime import is_uri

    cfg = distill_config(cfg, args)
    summary = run_distillation(cfg)
    student = summary.get("best_checkpoint") or summary.get("latest_checkpoint")
    if not student:
        raise CheckpointError(f"run '{summary['run_name']}' wrote no checkpoint; see {summary['run_dir']}")
    cfg = apply_overrides(cfg, {"train.name": summary["run_name"]})
    if is_uri(summary["run_dir"]):
        print(f"student checkpoint: {student} (report skipped: the run directory is not local)")
        return 0
    ev = load_splits(cfg.data, cfg.model.num_labels).eval
    threads = 1
    scores = measure_checkpoints({"teacher": cfg.distill.teacher, "student": student},
                                 ev.column("text").to_pylist(), ev.column("label").to_pylist(),
                                 cfg.data.max_length, batch_size=32, threads=threads)
    notes = [f"{len(ev)} validation sentences ({cfg.data.dataset}); accuracy from the checkpoints "
             "loaded with transformers, the student's best by eval_accuracy",
             f"CPU samples/s: batches of 32, torch threads {threads}, fastest of 5 interleaved "
             "passes in the same process",
             "checkpoint MB: the files a server loads (model.safetensors, config, tokenizer)"]
    path = write_report(summary["run_dir"], scores, cfg, notes)
    print("\n" + path.read_text())
    print(f"student checkpoint: {student}\nserve it: distilray serve --checkpoint {student}")
    return 0
