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
    global_order,
    make_plan,
    param_groups,
    rank_micro_batches,
    rank_row_indices,
    slots_per_step,
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


def _trained_rows(ordered, plan, batch_size, num_workers, accum, worlds):
    """Rows each optimizer step trains when the run switches world size at given steps.

    `worlds` maps a starting step to the world size from then on. Each (re)start deals the
    slot-ordered rows with `rank_row_indices`; each rank skips `step × its micro-batches`
    (what `train_loop_per_worker` does on restore) and runs its micro-batches per step.
    """
    slots = slots_per_step(num_workers, accum)
    starts = sorted(worlds) + [plan.total_steps]
    per_step: dict[int, list[str]] = {}
    for begin, end in zip(starts, starts[1:], strict=False):
        world = worlds[begin]
        parts = rank_row_indices(ordered.num_rows, batch_size, slots, world)
        for rank, index in enumerate(parts):
            rows = ordered.take(pa.array(index)).column("text").to_pylist()
            micro = rank_micro_batches(slots, world, rank)
            batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            for step in range(begin, end):
                for b in batches[step * micro:(step + 1) * micro]:
                    per_step.setdefault(step, []).extend(b)
    return per_step


@pytest.mark.parametrize(("num_workers", "accum", "worlds"), [
    (2, 1, {0: 2, 5: 1, 9: 2}),      # lose a node at step 5, get it back at step 9
    (3, 2, {0: 3, 4: 2, 7: 1, 11: 3}),  # 6 slots over 2 workers, then 1, then 3
    (3, 1, {0: 3, 3: 2}),            # uneven: 3 slots over 2 workers
])
def test_elastic_resize_trains_the_same_rows_per_step_and_none_twice_an_epoch(num_workers, accum, worlds):
    batch = 4
    table = _table(300)
    plan = make_plan(300, batch, num_workers, accum, epochs=2)
    ordered = global_order(table, plan, num_workers, batch, seed=3)
    fixed = _trained_rows(ordered, plan, batch, num_workers, accum, {0: num_workers})
    elastic = _trained_rows(ordered, plan, batch, num_workers, accum, worlds)
    assert sorted(fixed) == sorted(elastic) == list(range(plan.total_steps))
    for step in range(plan.total_steps):
        assert len(elastic[step]) == batch * num_workers * accum  # the global batch is kept
        assert sorted(elastic[step]) == sorted(fixed[step])
    for epoch in range(plan.epochs):
        steps = range(epoch * plan.steps_per_epoch, min((epoch + 1) * plan.steps_per_epoch, plan.total_steps))
        rows = [r for s in steps for r in elastic[s]]
        assert len(rows) == len(set(rows)) == plan.rows_per_epoch, "a row trained twice in an epoch"


def test_rank_micro_batches_cover_every_slot_once():
    for slots in (1, 2, 3, 6):
        for world in range(1, slots + 1):
            assert sum(rank_micro_batches(slots, world, r) for r in range(world)) == slots
    assert [rank_micro_batches(3, 2, r) for r in range(2)] == [2, 1]


def test_layout_for_the_configured_workers_is_unchanged():
    """`arrange_for_workers` (the fixed-size layout) is rank_row_indices at world = num_workers."""
    table = _table(200)
    plan = make_plan(200, 8, 2, 1, 2)
    ordered = global_order(table, plan, 2, 8, seed=5)
    parts = rank_row_indices(ordered.num_rows, 8, slots_per_step(2, 1), 2)
    dealt = ordered.take(pa.array(np.concatenate(parts)))
    assert dealt.equals(arrange_for_workers(table, plan, 2, 8, seed=5))


def test_min_workers_the_cluster_cannot_place_is_refused():
    from distilray.config import TrainConfig
    from distilray.errors import ConfigError
    from distilray.train.run import check_min_workers_placeable, placeable_workers

    nodes = [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}]
    assert placeable_workers(nodes, {"CPU": 2.0}) == 2
    check_min_workers_placeable(TrainConfig(num_workers=4, min_workers=2, cpus_per_worker=2.0), nodes)
    with pytest.raises(ConfigError, match=r"train.min_workers=3 can never be placed: the cluster's 3 "
                       r"node\(s\) have 7 CPUs and room for 2 worker\(s\) of 2 CPU each"):
        check_min_workers_placeable(TrainConfig(num_workers=4, min_workers=3, cpus_per_worker=2.0), nodes)
    with pytest.raises(ConfigError, match="needs 5 CPUs"):  # fits per node, not with Ray Data's CPUs
        check_min_workers_placeable(TrainConfig(num_workers=4, min_workers=2, cpus_per_worker=2.0),
                                    [{"CPU": 2.0}, {"CPU": 2.0}])


def test_min_workers_above_num_workers_is_a_config_error():
    from distilray.config import load_config
    from distilray.errors import ConfigError

    with pytest.raises(ConfigError, match="train.min_workers=3 must be <= train.num_workers=2"):
        load_config(None, ["train.num_workers=2", "train.min_workers=3"])
