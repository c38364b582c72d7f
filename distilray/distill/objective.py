"""Distillation as a training `Objective`, and who picks the objective of a run.

`DistillObjective` fills train's seam (`distilray/train/objective.py`): the driver tokenises
with the teacher's vocabulary and checks teacher and student before any work, the teacher's
logits are computed once when precomputed, each worker trains the student with
alpha · T² · KL(teacher ‖ student at T) + (1 − alpha) · CE (+ cosine on hidden states), and
each checkpoint names its student and teacher. The dependency points one way: distill imports
train, never the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distilray.config import Config, apply_overrides
from distilray.distill.student import (
    StudentSpec,
    build_student,
    model_depth,
    model_width,
    parse_student,
)
from distilray.distill.teacher import (
    load_teacher,
    precompute_teacher_logits,
    resolve_teacher_dir,
    teacher_config,
)
from distilray.errors import ConfigError, ModelError
from distilray.losses import cosine_hidden_loss, distillation_loss
from distilray.train.objective import Classification, Objective
from distilray.train.run import run_training

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distilray.train.run import PreparedRun


class DistillObjective:
    """A student learning from a frozen teacher (`distill.*`); holds the teacher only on workers."""

    def __init__(self) -> None:
        self.teacher: PreTrainedModel | None = None

    def prepare(self, cfg: Config) -> Config:
        """Resolve the teacher, and tokenise with its vocabulary: model.name = the teacher's dir."""
        if not cfg.distill.teacher:
            raise ConfigError("distill.teacher is not set; pass --teacher with a checkpoint written by "
                              "distilray train")
        teacher = str(resolve_teacher_dir(cfg.distill.teacher))
        return apply_overrides(cfg, {"distill.teacher": teacher, "model.name": teacher})

    def check(self, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
        check_distill_config(cfg, tokenizer)

    def extra_columns(self, run: PreparedRun) -> pa.Table | None:
        """The teacher's logits per training row when precomputed (cached: Tune trials share them)."""
        if run.cfg.distill.teacher_logits != "precomputed":
            return None
        return precompute_teacher_logits(run, batch_size=max(32, 4 * run.cfg.train.batch_size))

    def batch_columns(self, cfg: Config) -> tuple[str, ...]:
        return ("teacher_logits",) if cfg.distill.teacher_logits == "precomputed" else ()

    def build_model(self, cfg: Config) -> PreTrainedModel:
        layers_k = parse_student(cfg.distill.student).layers is not None
        return build_student(cfg, load_teacher(cfg) if layers_k else None)

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        if cfg.distill.teacher_logits == "on_the_fly":
            self.teacher = load_teacher(cfg).to(device)

    def needs_hidden_states(self, cfg: Config) -> bool:
        return cfg.distill.cosine_weight > 0

    def loss(self, cfg: Config, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = out.hidden_states[-1] if self.needs_hidden_states(cfg) else None
        return distill_step_loss(cfg, out.logits.float(), batch, self.teacher, hidden)

    def checkpoint_meta(self, cfg: Config) -> dict[str, Any]:
        """A student: model.name is only the teacher whose vocabulary it reads."""
        d = cfg.distill
        return {"model_name": d.student,
                "distill": {"teacher": d.teacher, "student": d.student, "temperature": d.temperature,
                            "alpha": d.alpha, "cosine_weight": d.cosine_weight}}


def objective_for(cfg: Config) -> Objective:
    """What `distilray train` and `tune` train: distillation when distill.teacher is set."""
    return DistillObjective() if cfg.distill.teacher else Classification()


def run_distillation(cfg: Config, dry_run: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """`distilray distill`'s training: validate, then fit the student on Ray Train (result.json)."""
    return run_training(cfg, DistillObjective(), dry_run=dry_run, callbacks=callbacks)


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


def check_distill_config(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse before any work: missing teacher, K too large, different vocabularies or labels."""
    from distilray.model import ModelSource, load_tokenizer

    d = cfg.distill
    spec = parse_student(d.student)
    problems = []
    if d.cosine_weight > 0 and d.teacher_logits != "on_the_fly":
        problems.append(f"distill.cosine_weight={d.cosine_weight} needs the teacher's hidden states, "
                        "which only distill.teacher_logits=on_the_fly computes; set one or the other")
    teacher_dir = resolve_teacher_dir(d.teacher or "")
    tcfg = teacher_config(teacher_dir)
    if spec.layers is not None:
        if tcfg.model_type != "distilbert":
            raise ModelError(f"distill.student=layers:{spec.layers} copies DistilBERT layers, but the "
                             f"teacher {teacher_dir} is a {tcfg.model_type!r} model; name a student "
                             "model instead (distill.student=<model>)")
        if spec.layers > model_depth(tcfg):
            problems.append(f"distill.student=layers:{spec.layers}: the teacher has {model_depth(tcfg)} "
                            f"layers; choose K between 1 and {model_depth(tcfg)}")
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
        check_named_student(cfg, spec, tcfg, teacher_vocab, teacher_labels)


def check_named_student(cfg: Config, spec: StudentSpec, tcfg: Any, teacher_vocab: dict[str, int],
                        teacher_labels: list[str]) -> None:
    """A named student must read the teacher's token ids and not classify other labels."""
    from transformers import AutoConfig

    from distilray.model import load_tokenizer, resolve_model

    d = cfg.distill
    source = resolve_model(spec.model or "", cfg.model.cache_dir)
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
    if d.cosine_weight > 0 and model_width(scfg) != model_width(tcfg):
        raise ConfigError(f"distill.cosine_weight={d.cosine_weight} compares hidden states, but the "
                          f"student is {model_width(scfg)} wide and the teacher {model_width(tcfg)}; "
                          "set distill.cosine_weight=0")
