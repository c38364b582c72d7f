"""Training pieces on CPU: step arithmetic, per-worker data layout, optimizer groups, schedule, collate."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from distilray.train.batches import PadCollate
from distilray.train.plan import (
    arrange_for_workers,
    build_optimizer,
    build_scheduler,
    even_split_indices,
    make_plan,
    param_groups,
)


def _table(n):
    return pa.table({"text": [f"row {i} " + "x " * (i % 17) for i in range(n)], "label": [i % 2 for i in range(n)]})


def test_plan_drops_the_last_partial_global_batch():
    plan = make_plan(1000, batch_size=8, world_size=2, grad_accum=2, epochs=3)
    assert plan.steps_per_epoch == 1000 // 32 == 31
    assert plan.rows_per_epoch == 31 * 32 and plan.micro_batches_per_epoch == 62
    assert plan.total_steps == 93
    capped = make_plan(1000, 8, 2, 2, 3, max_steps=40)
    assert capped.total_steps == 40 and capped.epochs == 2
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        make_plan(10, 8, 2, 1, 1)


def test_two_workers_of_8_see_the_global_batches_of_one_worker_of_16():
    table = _table(200)
    plan1 = make_plan(200, 16, 1, 1, 2)
    plan2 = make_plan(200, 8, 2, 1, 2)
    one = arrange_for_workers(table, plan1, 1, 16, seed=5).column("text").to_pylist()
    two = arrange_for_workers(table, plan2, 2, 8, seed=5).column("text").to_pylist()
    half = len(two) // 2
    rank0, rank1 = two[:half], two[half:]
    for step in range(plan1.total_steps):
        global_one = one[step * 16:(step + 1) * 16]
        global_two = rank0[step * 8:(step + 1) * 8] + rank1[step * 8:(step + 1) * 8]
        assert global_one == global_two
    epoch0, epoch1 = one[:plan1.rows_per_epoch], one[plan1.rows_per_epoch:]
    assert len(set(epoch0)) == len(epoch0) and epoch0 != epoch1  # reshuffled each epoch


def test_bucketed_layout_keeps_rows_and_groups_lengths():
    table = _table(640)
    plan = make_plan(640, 16, 1, 1, 1)
    plain = arrange_for_workers(table, plan, 1, 16, seed=0)
    bucketed = arrange_for_workers(table, plan, 1, 16, seed=0, bucket_batches=10)
    assert sorted(plain.column("text").to_pylist()) == sorted(bucketed.column("text").to_pylist())

    def spread(t):
        lengths = np.array([len(s) for s in t.column("text").to_pylist()]).reshape(-1, 16)
        return (lengths.max(1) - lengths.min(1)).mean()

    assert spread(bucketed) < spread(plain) / 2


def test_even_split_indices_cover_every_row_once():
    assert even_split_indices(10, 3) == [4, 7]
    assert even_split_indices(5, 1) == []
    assert even_split_indices(2, 4) == [1, 2, 2]


def test_no_weight_decay_on_bias_and_layernorm():
    from distilray.model import load_classifier, resolve_model

    model = load_classifier(resolve_model("tiny"), ["n", "p"])
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith(("bias", "LayerNorm.weight", "layer_norm.weight")) for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_linear_schedule_with_warmup_reaches_zero():
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0)
    sched = build_scheduler(opt, "linear", total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 8)
    assert sched.get_last_lr()[0] == pytest.approx(0.0)


def test_pad_collate_pads_ragged_rows_dynamically():
    batch = {"input_ids": np.array([np.array([101, 5, 102]), np.array([101, 102])], dtype=object),
             "label": np.array([1, 0])}
    out = PadCollate(0, "dynamic", 128, 8)(batch)
    assert out["input_ids"].shape == (2, 8) and out["attention_mask"].sum().item() == 5
    assert out["labels"].tolist() == [1, 0]
