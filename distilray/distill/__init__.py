"""`distilray distill`: a fine-tuned teacher trains a smaller, faster student on the train loop.

Distillation reuses `distilray.train` whole (validation, ordered shards, Ray Data tokenisation,
checkpoints, restarts) through its `Objective` seam; what differs lives here:

- `student`: `layers:K` is a DistilBERT with K of the teacher's layers (every other one for
  K = depth/2, as the DistilBERT paper initialises it, keeping the top layer), the teacher's
  embeddings and classifier head; or any model the resolver knows, sharing the teacher's
  vocabulary (pure, no Ray);
- `teacher`: finding and loading the frozen teacher, and its logits for every training row
  by Ray Data batch inference, cached on disk (`distill.teacher_logits=precomputed`);
- `objective`: `DistillObjective` — the loss alpha · T² · KL(teacher ‖ student at T) +
  (1 − alpha) · CE (`distilray.losses`), the checks, the student's checkpoint fields — and
  `objective_for(cfg)`, which `distilray train` and `distilray tune` call too;
- `report`: teacher vs student accuracy, macro-F1, size and CPU speed, measured in the same
  process on the same batches (`distill_report.md`).

This file imports nothing (see `distilray/train/__init__.py`).
"""
