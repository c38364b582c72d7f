"""What a training recipe plugs into the one loop: the `Objective` seam (pure: no Ray).

The driver (`train/run.py`) and every worker (`train/loop.py`) call these hooks and nothing
recipe-specific, so fine-tuning and distillation share one loop: torchtune's `_loss_step`
seam, extended to the driver side. `Classification` is plain fine-tuning with cross-entropy;
the distill package's `DistillObjective` is the other implementation (train never imports
it). An objective travels to the workers inside `train_loop_config`: it is a
module-level class, so Ray pickles it by reference, and it holds no model until
`setup_worker` runs on the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from distilray.config import Config

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distilray.train.run import PreparedRun


class Objective(Protocol):
    """The lifecycle of one recipe: driver-side hooks first, then the worker-side ones."""

    # driver side, before Ray
    def prepare(self, cfg: Config) -> Config:
        """The config the run really uses (distillation: tokenise with the teacher's vocabulary)."""
        ...

    def check(self, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse what could never train, before any work (raise a DistilrayError)."""
        ...

    def extra_columns(self, run: PreparedRun) -> pa.Table | None:
        """Float columns added to the training rows, row for row (called once per run)."""
        ...

    # worker side
    def batch_columns(self, cfg: Config) -> tuple[str, ...]:
        """Columns of `extra_columns` that the collate carries into each batch as float tensors."""
        ...

    def build_model(self, cfg: Config) -> PreTrainedModel:
        """The model the worker trains (identical on every worker)."""
        ...

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        """Whatever else a worker needs before its first batch (distillation: a frozen teacher)."""
        ...

    def needs_hidden_states(self, cfg: Config) -> bool:
        """Whether `loss` reads the model's hidden states (the forward pass then returns them)."""
        ...

    def loss(self, cfg: Config, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar to minimise for one micro-batch, from the model output (under autocast)."""
        ...

    def checkpoint_meta(self, cfg: Config) -> dict[str, Any]:
        """Fields merged into each checkpoint's `distilray.json`."""
        ...


class Classification:
    """Fine-tuning: the configured classifier, cross-entropy on the labels."""

    def prepare(self, cfg: Config) -> Config:
        return cfg

    def check(self, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> None:
        return None

    def extra_columns(self, run: PreparedRun) -> pa.Table | None:
        return None

    def batch_columns(self, cfg: Config) -> tuple[str, ...]:
        return ()

    def build_model(self, cfg: Config) -> PreTrainedModel:
        from distilray.model import load_classifier, resolve_model, set_dropout

        model = load_classifier(resolve_model(cfg.model.name, cfg.model.cache_dir),
                                cfg.model.label_names, seed=cfg.train.seed)
        if cfg.model.dropout is not None:
            set_dropout(model, cfg.model.dropout)
        return model

    def setup_worker(self, cfg: Config, device: torch.device) -> None:
        return None

    def needs_hidden_states(self, cfg: Config) -> bool:
        return False

    def loss(self, cfg: Config, out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(out.logits.float(), batch["labels"])

    def checkpoint_meta(self, cfg: Config) -> dict[str, Any]:
        return {}
