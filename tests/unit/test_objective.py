"""The Objective seam: who picks it, what it adds, and that train never reaches into distill."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from distilray.config import load_config
from distilray.distill.objective import DistillObjective, objective_for
from distilray.train.batches import PadCollate
from distilray.train.objective import Classification

PACKAGE = Path(__file__).resolve().parents[2] / "distilray"


def test_objective_for_distils_only_with_a_teacher(tmp_path):
    assert isinstance(objective_for(load_config(None, [])), Classification)
    cfg = load_config(None, [f"distill.teacher={tmp_path}", "distill.teacher_logits=precomputed"])
    objective = objective_for(cfg)
    assert isinstance(objective, DistillObjective)
    assert objective.batch_columns(cfg) == ("teacher_logits",)
    on_the_fly = load_config(None, [f"distill.teacher={tmp_path}", "distill.teacher_logits=on_the_fly"])
    assert objective.batch_columns(on_the_fly) == ()
    assert Classification().batch_columns(cfg) == () and Classification().checkpoint_meta(cfg) == {}


def test_objectives_pickle_by_reference_and_hold_no_model():
    for objective in (Classification(), DistillObjective()):
        data = pickle.dumps(objective)
        assert len(data) < 200 and type(pickle.loads(data)) is type(objective)
    assert DistillObjective().teacher is None


def test_student_checkpoint_names_student_and_teacher(tmp_path):
    cfg = load_config(None, [f"distill.teacher={tmp_path}", "distill.student=layers:2", "distill.alpha=0.3"])
    meta = DistillObjective().checkpoint_meta(cfg)
    assert meta["model_name"] == "layers:2"
    assert meta["distill"] == {"teacher": str(tmp_path), "student": "layers:2",
                               "temperature": cfg.distill.temperature, "alpha": 0.3,
                               "cosine_weight": cfg.distill.cosine_weight}


def test_pad_collate_carries_the_objective_float_columns():
    batch = {"input_ids": np.array([np.array([101, 5, 102]), np.array([101, 102])], dtype=object),
             "label": np.array([1, 0]),
             "teacher_logits": np.array([np.array([0.5, -0.5]), np.array([-1.0, 1.0])], dtype=object)}
    out = PadCollate(0, "dynamic", 128, 8, float_columns=("teacher_logits",))(batch)
    assert out["teacher_logits"].dtype == torch.float32
    assert out["teacher_logits"].tolist() == [[0.5, -0.5], [-1.0, 1.0]]
    assert "teacher_logits" not in PadCollate(0, "dynamic", 128, 8)(batch)


def test_train_never_imports_distill_nor_reads_its_config():
    for path in sorted((PACKAGE / "train").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("distilray.distill"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("distilray.distill") for a in node.names), path
            elif isinstance(node, ast.Attribute):
                assert node.attr != "distill", f"{path}:{node.lineno} reads .distill"


def test_pure_training_modules_do_not_import_ray():
    code = ("import sys; import distilray.train.plan, distilray.train.objective, "
            "distilray.distill.student, distilray.metrics; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
