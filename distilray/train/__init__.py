"""`distilray train`: one data-parallel loop for fine-tuning and distillation on Ray Train V2.

- `plan`: step arithmetic, the per-worker row layout, optimizer and schedule (pure, no Ray);
- `objective`: the `Objective` seam (what differs between recipes) and `Classification`;
- `batches`: Ray Data tokenisation, ordered per-worker shards, padding collate;
- `loop`: `train_loop_per_worker`, the loop every worker runs;
- `run`: the driver — validate, `fit` on a `TorchTrainer`, pick the best checkpoint.

This file imports nothing: importing a submodule runs it first, and the pure ones must stay
free of Ray.
"""
