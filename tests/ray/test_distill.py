"""`distilray distill` on a real local Ray cluster: both teacher-logit modes, the report, Tune."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from distilray.cli import main
from distilray.config import load_config
from distilray.distill.objective import run_distillation
from distilray.distill.report import REPORT_FILE, REPORT_JSON
from distilray.distill.teacher import LOGITS_CACHE_DIR
from distilray.train.objective import Classification
from distilray.train.run import read_metrics, run_training

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"]


@pytest.fixture(scope="module")
def tiny_teacher(ray_4_cpus, tmp_path_factory) -> str:
    """The 2-layer `tiny` model trained 3 epochs on 1080 synthetic sentences (eval accuracy ~0.8)."""
    storage = tmp_path_factory.mktemp("teacher")
    result = run_training(load_config(None, [
        "model.name=tiny", "model.dropout=0.0", "data.dataset=synthetic:sentiment",
        "data.synthetic_size=1200", "data.max_length=64", "train.lr=1e-3", "train.epochs=3",
        "train.scheduler=constant",
        f"train.storage_path={storage}", "train.name=teacher", "train.max_failures=0",
        "train.log_every_steps=100"]), Classification())
    assert result["best_metrics"]["eval_accuracy"] >= 0.75, result["best_metrics"]
    return result["best_checkpoint"]


def student_cfg(tmp_path, teacher, name, *extra):
    return load_config(None, student_overrides(tmp_path, teacher, name, *extra))


def student_overrides(tmp_path, teacher, name, *extra) -> list[str]:
    # model.name is left at its default: distillation tokenises with the teacher's vocabulary.
    return [
        f"distill.teacher={teacher}", "distill.student=layers:1", "distill.alpha=0.7",
        "distill.temperature=2.0", "model.dropout=0.0", "data.dataset=synthetic:sentiment",
        "data.synthetic_size=600", "data.max_length=64", "train.lr=1e-3", "train.epochs=1",
        f"train.storage_path={tmp_path}", f"train.name={name}", "train.log_every_steps=1",
        "train.max_failures=0", *extra]


def test_both_teacher_logit_modes_train_the_same_student(tiny_teacher, tmp_path, capsys):
    # on_the_fly, 1 worker × 16, through the CLI's entry point (trains, then writes the report)
    sets = student_overrides(tmp_path, "unused", "unused", "train.batch_size=16")
    argv = ["distill", "--teacher", tiny_teacher, "--student", "layers:1", "--workers", "1",
            "--name", "fly", *(arg for value in sets for arg in ("--set", value))]
    assert main(argv) == 0
    fly_dir = tmp_path / "fly"
    assert "| student | 1 |" in capsys.readouterr().out

    # precomputed by Ray Data batch inference, carried with the rows to 2 workers × 8
    pre = run_distillation(student_cfg(tmp_path, tiny_teacher, "pre", "train.num_workers=2",
                                       "train.batch_size=8", "distill.teacher_logits=precomputed"))
    fly, pre_losses = train_losses(fly_dir), train_losses(pre["run_dir"])
    assert len(fly) == len(pre_losses) == 540 // 16
    diffs = [abs(a - b) for a, b in zip(fly, pre_losses, strict=True)]
    assert max(diffs) < 2e-3, diffs  # same global batches, same teacher targets, row for row
    assert max(fly) - min(fly) > 0.02

    # the cache holds the teacher's own logits, in training-row order
    (cache,) = (tmp_path / LOGITS_CACHE_DIR).glob("*.parquet")
    cached = torch.tensor(pq.read_table(cache).column("teacher_logits").to_pylist())
    from transformers import AutoModelForSequenceClassification

    from distilray.data import encode_for_model, load_splits
    from distilray.model import ModelSource, load_tokenizer

    cfg = student_cfg(tmp_path, tiny_teacher, "x")
    texts = load_splits(cfg.data, 2).train.column("text").to_pylist()
    tok = load_tokenizer(ModelSource(tiny_teacher, "local", tiny_teacher))
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    enc = encode_for_model(tok, texts[:32], 64)
    with torch.inference_mode():
        direct = teacher(input_ids=torch.from_numpy(enc["input_ids"]),
                         attention_mask=torch.from_numpy(enc["attention_mask"])).logits
    assert cached.shape == (540, 2)
    assert torch.allclose(cached[:32], direct, atol=1e-4)
    assert cached[:, 1].sub(cached[:, 0]).std() > 0.5  # informative targets, so a misalignment shows

    # a second run reuses the cache instead of running the teacher again
    run_distillation(student_cfg(tmp_path, tiny_teacher, "pre2", "train.max_steps=2",
                                 "distill.teacher_logits=precomputed"))
    assert len(list((tmp_path / LOGITS_CACHE_DIR).glob("*.parquet"))) == 1

    # the report compares teacher and student, both measured here
    report = (fly_dir / REPORT_FILE).read_text()
    assert "| teacher | 2 |" in report and "| student | 1 |" in report and "retention" in report
    scores = json.loads((fly_dir / REPORT_JSON).read_text())
    teacher_row, student_row = scores["scores"]
    assert student_row["parameters"] < teacher_row["parameters"]
    assert student_row["size_bytes"] < teacher_row["size_bytes"]
    assert scores["retention"]["student"]["speedup"] > 1.0

    # the student is a plain Hugging Face checkpoint
    from transformers import pipeline

    result = json.loads((fly_dir / "result.json").read_text())
    clf = pipeline("text-classification", model=result["best_checkpoint"])
    assert clf.model.config.n_layers == 1
    texts = ["the plot was brilliant and moving", "the acting was dull and boring"]
    assert [o["label"] for o in clf(texts)] == ["positive", "negative"]
    # ... and what `distilray serve` loads, naming the student and its teacher
    from distilray.serve.predictor import Predictor

    served = Predictor(result["best_checkpoint"], max_length=64)
    assert served.model_name == "layers:1" and served.info["run_name"] == "fly"
    assert [p.label for p in served.predict(texts)] == ["positive", "negative"]
    meta = json.loads(Path(result["best_checkpoint"], "distilray.json").read_text())
    assert meta["distill"]["teacher"] == str(Path(tiny_teacher).resolve())


def test_tune_searches_temperature_and_alpha(tiny_teacher, tmp_path):
    from distilray.tune.search import run_tune

    cfg = load_config(REPO / "tune" / "distill-t-alpha.yaml", [
        f"distill.teacher={tiny_teacher}", "distill.student=layers:1", "model.dropout=0.0",
        "data.dataset=synthetic:sentiment", "data.synthetic_size=600", "data.max_length=64",
        "data.max_train_samples=null", "train.lr=1e-3", "train.epochs=1", "train.num_workers=1",
        "train.log_every_steps=100", "train.max_failures=0", f"tune.storage_path={tmp_path}",
        "tune.name=kd", "tune.space={distill.temperature: {type: grid, values: [1.0, 4.0]}, "
        "distill.alpha: {type: grid, values: [0.9]}}"])
    summary = run_tune(cfg)
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    runs_dir = tmp_path / "kd" / "runs"
    losses = {}
    for run in (r for r in runs_dir.iterdir() if r.is_dir() and not r.name.startswith(".")):
        trial_cfg = load_config(run / "config.yaml")
        assert trial_cfg.distill.teacher == str(Path(tiny_teacher).resolve())
        assert trial_cfg.model.name == trial_cfg.distill.teacher  # tokenised with the teacher's vocabulary
        losses[trial_cfg.distill.temperature] = train_losses(run)
    assert sorted(losses) == [1.0, 4.0]
    # the searched T reached the loss: same batches and start, different soft targets
    assert losses[1.0][0] != pytest.approx(losses[4.0][0], abs=1e-4)
    assert len(list((runs_dir / LOGITS_CACHE_DIR).glob("*.parquet"))) == 1  # one teacher pass for all trials


@pytest.mark.slow
@pytest.mark.timeout(2700)  # may train the session's SST-2 teacher first (~8 min, ~20 min on a busy machine)
def test_sst2_student_keeps_97_percent_and_is_faster(sst2_checkpoint, sst2_student):
    """Issue 8, acceptance 2: layers:3 of the SST-2 teacher, distilled with configs/distill.yaml.

    The alpha = 0 student beside it is trained by benchmarks/distill.py (same config), which
    keeps this test to one student run inside CI's time budget.
    """
    from distilray.data import load_splits
    from distilray.distill.report import measure_checkpoints, render_report, retention

    cfg, kd = sst2_student["cfg"], sst2_student
    ev = load_splits(cfg.data, 2).eval
    # fastest of 2 interleaved timed passes (a teacher pass is ~12 s on one thread; the
    # report's default of 5 added ~55 s to CI for a ratio that measured ~1.9-2.0 either way)
    scores = measure_checkpoints({"teacher": sst2_checkpoint, "student (KD)": kd["best_checkpoint"]},
                                 ev.column("text").to_pylist(), ev.column("label").to_pylist(), 128,
                                 repeats=2)
    report = render_report(scores)
    print("\n" + report)
    teacher, student = scores
    assert teacher.accuracy >= 0.83 and teacher.layers == 6 and student.layers == 3
    r = retention(scores)["student (KD)"]
    assert r["accuracy_retention"] >= 0.97, report
    assert r["speedup"] >= 1.6, report
    assert student.parameters < 0.8 * teacher.parameters, report
