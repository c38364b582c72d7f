"""Student construction, distillation checks and the report, on small random models (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from distilray.checkpoints import checkpoint_size
from distilray.cli import main
from distilray.config import load_config
from distilray.distill.objective import check_distill_config, distill_step_loss
from distilray.distill.report import ModelScore, measure_checkpoints, render_report, retention
from distilray.distill.student import (
    build_student,
    init_student_from_teacher,
    parse_student,
    student_layer_map,
)
from distilray.distill.teacher import load_teacher, resolve_teacher_dir
from distilray.errors import CheckpointError, ConfigError, ModelError
from distilray.files import write_parquet_atomic
from distilray.losses import distillation_loss
from distilray.model import ModelSource, load_tokenizer, tiny_dir

LAYER = re.compile(r"transformer\.layer\.(\d+)\.(.+)$")


def save_teacher(path: Path, n_layers: int = 6, labels=("negative", "positive"), dim: int = 32) -> Path:
    """A random DistilBERT classifier with the uncased vocabulary, saved like a train checkpoint."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(7)
    config = DistilBertConfig(vocab_size=30522, n_layers=n_layers, n_heads=2, dim=dim, hidden_dim=2 * dim,
                              num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={v: i for i, v in enumerate(labels)})
    model = DistilBertForSequenceClassification(config)
    with torch.no_grad():  # zero biases and unit LayerNorms would look alike in every layer
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(path)
    load_tokenizer(ModelSource("tiny", "tiny", str(tiny_dir()))).save_pretrained(path)
    (path / "training_state.pt").write_bytes(b"x" * 1000)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher"))


def distill_cfg(teacher: Path, *extra: str):
    return load_config(None, [f"distill.teacher={teacher}", f"model.name={teacher}", *extra])


def tokenizer_of(path: Path):
    return load_tokenizer(ModelSource(str(path), "local", str(path)))


# --------------------------------------------------------------------------- layers:K


@pytest.mark.parametrize("n,k,expected", [
    (6, 3, [1, 3, 5]), (12, 6, [1, 3, 5, 7, 9, 11]), (6, 6, [0, 1, 2, 3, 4, 5]),
    (6, 2, [2, 5]), (6, 4, [0, 2, 3, 5]), (6, 1, [5]), (2, 1, [1])])
def test_layer_map_takes_every_other_layer_keeping_the_top(n, k, expected):
    assert student_layer_map(n, k) == expected


def test_layer_map_is_increasing_and_ends_at_the_top_for_every_k():
    for n in range(1, 13):
        for k in range(1, n + 1):
            m = student_layer_map(n, k)
            assert len(m) == k and m[-1] == n - 1 and all(a < b for a, b in zip(m, m[1:], strict=False))
    with pytest.raises(ConfigError, match="teacher has 6 layers"):
        student_layer_map(6, 7)


def test_parse_student():
    assert parse_student("layers:3").layers == 3
    assert parse_student("tiny").model == "tiny"
    for bad in ("layers:0", "layers:x", "layers:", ""):
        with pytest.raises(ConfigError):
            parse_student(bad)


def test_layers_k_student_copies_exactly_the_intended_teacher_layers(teacher_dir):
    cfg = distill_cfg(teacher_dir, "distill.student=layers:3")
    teacher = load_teacher(cfg).state_dict()
    student = build_student(cfg, load_teacher(cfg))
    assert student.config.n_layers == 3 and student.training
    state = student.state_dict()
    per_layer = len([k for k in teacher if ".layer.0." in k])
    assert per_layer == 16 and len(state) == len(teacher) - 3 * per_layer
    copied = {}
    for key, value in state.items():
        m = LAYER.search(key)
        if m is None:  # embeddings, pre_classifier, classifier
            assert torch.equal(value, teacher[key]), key
            continue
        source = key.replace(f"layer.{m[1]}.", f"layer.{[1, 3, 5][int(m[1])]}.")
        assert torch.equal(value, teacher[source]), (key, source)
        copied.setdefault(int(m[1]), 0)
        copied[int(m[1])] += 1
        for skipped in (0, 2, 4):  # random layers differ, so a wrong map would be caught
            assert not torch.equal(value, teacher[key.replace(f"layer.{m[1]}.", f"layer.{skipped}.")])
    assert copied == {0: per_layer, 1: per_layer, 2: per_layer}
    assert any(k.startswith("classifier.") for k in state) and any("pre_classifier" in k for k in state)


def test_full_depth_student_reproduces_the_teacher_logits(teacher_dir):
    cfg = distill_cfg(teacher_dir, "distill.student=layers:6")
    teacher, student = load_teacher(cfg), build_student(cfg, load_teacher(cfg)).eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        assert torch.allclose(student(input_ids=ids, attention_mask=mask).logits,
                              teacher(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


def test_init_student_rejects_non_distilbert_weights():
    with pytest.raises(ModelError, match="not a DistilBERT"):
        init_student_from_teacher({"bert.encoder.layer.0.x": torch.zeros(1)}, [0])


def test_named_student_from_the_resolver(teacher_dir):
    student = build_student(distill_cfg(teacher_dir, "distill.student=tiny", "model.dropout=0.0"), None)
    assert student.config.n_layers == 2 and student.config.dim == 64
    assert student.config.id2label == {0: "negative", 1: "positive"}
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))


# --------------------------------------------------------------------------- checks before training


def test_valid_config_passes(teacher_dir):
    check_distill_config(distill_cfg(teacher_dir, "distill.student=layers:3"), tokenizer_of(teacher_dir))
    check_distill_config(distill_cfg(teacher_dir, "distill.student=tiny"), tokenizer_of(teacher_dir))


def test_missing_or_incomplete_teacher_is_a_checkpoint_error(tmp_path, teacher_dir):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_teacher_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_teacher_dir(str(tmp_path / "empty"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        resolve_teacher_dir(str(half))


def test_run_directory_resolves_to_its_best_checkpoint(tmp_path, teacher_dir):
    (tmp_path / "result.json").write_text(json.dumps({"best_checkpoint": str(teacher_dir)}))
    assert resolve_teacher_dir(str(tmp_path)) == teacher_dir.resolve()


def test_k_larger_than_teacher_depth(teacher_dir):
    with pytest.raises(ConfigError, match=r"layers:7: the teacher has 6 layers; choose K between 1 and 6"):
        check_distill_config(distill_cfg(teacher_dir, "distill.student=layers:7"), tokenizer_of(teacher_dir))


def test_different_label_sets(tmp_path, teacher_dir):
    three = save_teacher(tmp_path / "three", labels=("negative", "neutral", "positive"))
    with pytest.raises(ModelError, match=r"predicts labels \['negative', 'neutral', 'positive'\]"):
        check_distill_config(distill_cfg(three), tokenizer_of(three))
    renamed = save_teacher(tmp_path / "renamed", labels=("neg", "pos"))
    with pytest.raises(ModelError, match="model.label_names"):
        check_distill_config(distill_cfg(renamed), tokenizer_of(renamed))


def small_vocab_model(path: Path, with_head_labels=None) -> Path:
    """A DistilBERT with its own 9-token vocabulary (a student that cannot read the teacher's ids)."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertModel,
        DistilBertTokenizerFast,
    )

    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "the"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    DistilBertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    kwargs = dict(vocab_size=len(vocab), n_layers=1, n_heads=2, dim=16, hidden_dim=32)
    if with_head_labels:
        config = DistilBertConfig(**kwargs, id2label=dict(enumerate(with_head_labels)),
                                  label2id={v: i for i, v in enumerate(with_head_labels)})
        DistilBertForSequenceClassification(config).save_pretrained(path)
    else:
        DistilBertModel(DistilBertConfig(**kwargs)).save_pretrained(path)
    return path


def test_different_vocabularies(tmp_path, teacher_dir):
    other = small_vocab_model(tmp_path / "small")
    with pytest.raises(ModelError, match=r"different vocabulary \(\d+ tokens\) than the teacher \(30522 tokens\)"):
        check_distill_config(distill_cfg(teacher_dir, f"distill.student={other}"), tokenizer_of(teacher_dir))
    # the data pipeline's tokenizer (model.name) must be the teacher's too
    with pytest.raises(ModelError, match="set model.name to the teacher's directory"):
        check_distill_config(distill_cfg(teacher_dir), tokenizer_of(other))


def test_student_with_other_labels(tmp_path, teacher_dir):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    other = tmp_path / "labelled"
    config = DistilBertConfig(vocab_size=30522, n_layers=1, n_heads=2, dim=16, hidden_dim=32,
                              id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})
    DistilBertForSequenceClassification(config).save_pretrained(other)
    tokenizer_of(teacher_dir).save_pretrained(other)
    with pytest.raises(ModelError, match=r"already classifies \['bad', 'good'\]"):
        check_distill_config(distill_cfg(teacher_dir, f"distill.student={other}"), tokenizer_of(teacher_dir))


def test_layers_k_needs_a_distilbert_teacher(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    bert = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=32,
                                             id2label={0: "negative", 1: "positive"},
                                             label2id={"negative": 0, "positive": 1})).save_pretrained(bert)
    tokenizer_of(Path(tiny_dir())).save_pretrained(bert)
    with pytest.raises(ModelError, match="teacher .* is a 'bert' model"):
        check_distill_config(distill_cfg(bert), tokenizer_of(bert))


def test_cosine_needs_on_the_fly_and_equal_widths(teacher_dir):
    with pytest.raises(ConfigError, match="only distill.teacher_logits=on_the_fly"):
        check_distill_config(distill_cfg(teacher_dir, "distill.cosine_weight=1.0",
                                         "distill.teacher_logits=precomputed"), tokenizer_of(teacher_dir))
    with pytest.raises(ConfigError, match="student is 64 wide and the teacher 32"):
        check_distill_config(distill_cfg(teacher_dir, "distill.cosine_weight=1.0", "distill.student=tiny"),
                             tokenizer_of(teacher_dir))


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys):
    assert main(["distill", "--student", "layers:2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "distilray distill: error: distill.teacher is not set; pass --teacher with a checkpoint "
        "written by distilray train")
    assert main(["distill", "--teacher", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilray distill: error: distill.teacher=") and "no such directory" in err
    assert len(err.splitlines()) == 1


def test_shipped_preset_loads():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "distill.yaml")
    assert cfg.distill.student == "layers:3" and cfg.distill.teacher_logits == "precomputed"


# --------------------------------------------------------------------------- loss hook


def test_on_the_fly_step_loss_uses_the_frozen_teacher_and_cosine(teacher_dir):
    cfg = distill_cfg(teacher_dir, "distill.student=layers:6", "distill.alpha=0.6", "distill.temperature=3",
                      "distill.cosine_weight=0.5")
    teacher = load_teacher(cfg)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = build_student(cfg, load_teacher(cfg))
    ids = torch.tensor([[101, 2023, 3185, 102, 0], [101, 2307, 2143, 2001, 102]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 1])}
    student.eval()  # same weights, no dropout: student == teacher
    out = student(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
    loss = distill_step_loss(cfg, out.logits, batch, teacher, out.hidden_states[-1])
    expected = distillation_loss(out.logits, out.logits.detach(), batch["labels"], 3.0, 0.6)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)  # KL and cosine both 0
    student.train()
    torch.manual_seed(0)
    out = student(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
    with_cos = distill_step_loss(cfg, out.logits, batch, teacher, out.hidden_states[-1])
    without = distill_step_loss(cfg, out.logits, batch, teacher, None)
    assert with_cos.item() > without.item()  # dropout moved the hidden states: cosine > 0
    with_cos.backward()
    assert all(p.grad is None for p in teacher.parameters())
    batch["teacher_logits"] = torch.tensor([[2.0, -2.0], [-1.0, 1.0]])
    pre = distill_step_loss(cfg, out.logits.detach(), batch, None)
    assert pre.item() == pytest.approx(
        distillation_loss(out.logits.detach(), batch["teacher_logits"], batch["labels"], 3.0, 0.6).item())


# --------------------------------------------------------------------------- report


def test_measure_checkpoints_compares_teacher_and_student(tmp_path, teacher_dir):
    cfg = distill_cfg(teacher_dir, "distill.student=layers:2")
    student_dir = tmp_path / "student"
    build_student(cfg, load_teacher(cfg)).save_pretrained(student_dir)
    tokenizer_of(teacher_dir).save_pretrained(student_dir)
    texts = ["a wonderful film", "dull and long", "the cast was superb", "boring"] * 4
    labels = [1, 0, 1, 0] * 4
    scores = measure_checkpoints({"teacher": str(teacher_dir), "student": str(student_dir)}, texts, labels,
                                 batch_size=4, repeats=2)
    teacher, student = scores
    assert (teacher.layers, student.layers) == (6, 2)
    per_layer = 4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 2 * 2 * 32  # q,k,v,out; ffn; 2 LayerNorms
    assert teacher.parameters - student.parameters == 4 * per_layer
    assert checkpoint_size(teacher_dir) == sum(
        f.stat().st_size for f in teacher_dir.iterdir() if f.name != "training_state.pt")
    assert teacher.size_bytes > student.size_bytes
    assert all(0 <= s.accuracy <= 1 and s.samples_per_s > 0 for s in scores)


def test_report_table_and_retention():
    scores = [ModelScore("teacher", "/t", 0.85, 0.84, 22_000_000, 6, 90 * 2**20, 100.0),
              ModelScore("student", "/s", 0.83, 0.825, 15_000_000, 3, 60 * 2**20, 190.0)]
    text = render_report(scores, ["same run"])
    assert "| student | 3 | 0.8300 | 0.8250 | 97.6% | 15.00M | 60.0 | 190.0 | 1.90× |" in text
    assert "| teacher | 6 | 0.8500 | 0.8400 | 100.0% |" in text and "- same run" in text
    r = retention(scores)["student"]
    assert r["accuracy_retention"] == pytest.approx(0.83 / 0.85)
    assert r["speedup"] == pytest.approx(1.9) and r["size_ratio"] == pytest.approx(60 / 90)


def test_alpha_zero_step_loss_is_cross_entropy_without_a_teacher_pass(teacher_dir):
    cfg = distill_cfg(teacher_dir, "distill.alpha=0.0")
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    labels = torch.tensor([1, 1])
    # neither a teacher nor teacher_logits: the alpha = 0 baseline never needs them
    loss = distill_step_loss(cfg, logits, {"labels": labels}, teacher=None)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_concurrent_cache_writers_all_succeed_and_leave_one_complete_file(tmp_path):
    """Two Tune trials computing the same teacher logits at once (a race seen in CI)."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"teacher_logits": [[0.5, -0.5]] * 20_000})
    cache = tmp_path / ".teacher-logits" / "key.parquet"
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(5):
                write_parquet_atomic(table, cache)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in cache.parent.iterdir()] == ["key.parquet"]
    assert pq.read_table(cache).equals(table)
