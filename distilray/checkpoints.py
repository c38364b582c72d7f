"""The checkpoint format, in one place.

A distilray checkpoint is a Hugging Face model directory (`from_pretrained(dir)` and
`pipeline(model=dir)` load it as is) plus two files of ours:
- `training_state.pt`: optimizer, scheduler, scaler, step, epoch (only what a resumed run needs);
- `distilray.json`: run name, step, epoch, metrics, model name, max_length, label names, and
  whatever the training objective adds (a student's teacher and distillation settings).
A run directory holds `checkpoint-step*/`, `metrics.jsonl`, `config.yaml` and `result.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distilray.errors import CheckpointError
from distilray.files import sha256_file, write_json_atomic

TRAINING_STATE = "training_state.pt"
CHECKPOINT_META = "distilray.json"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.yaml"
CHECKPOINT_PREFIX = "checkpoint-step"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
NOT_SERVED = frozenset({TRAINING_STATE})
"""Files a server never loads (and `best/` or a bundle never copies)."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(directory: Path, model: Any, tokenizer: Any, training_state: dict[str, Any],
                    meta: dict[str, Any]) -> None:
    """Hugging Face files, then the training state, then `distilray.json` last."""
    import torch

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save(training_state, directory / TRAINING_STATE)
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def read_meta(path: str | Path) -> dict[str, Any]:
    """`distilray.json` of a checkpoint, {} when it has none (a plain Hugging Face directory)."""
    meta_file = Path(path) / CHECKPOINT_META
    if not meta_file.exists():
        return {}
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_file}: not valid JSON ({exc})") from None


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def write_result(run_dir: str | Path, summary: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / RESULT_FILE, summary)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory as given; a search's `best/`; a `distilray train` run's best checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "best" / "config.json").exists():  # a `distilray tune` experiment
            return (path / "best").resolve()
        result = read_result(path) or {}
        best = result.get("best_checkpoint")
        if best and Path(best, "config.json").exists():
            return Path(best).resolve()
    return path


def check_servable(checkpoint: str | Path) -> Path:
    """Fail early, naming the missing file, unless `checkpoint` is a servable HF directory."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint}: no such directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"checkpoint {path}: no config.json — not a Hugging Face model "
                              "directory (serve a `distilray train` checkpoint or a tune best/)")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        raise CheckpointError(f"checkpoint {path}: no weights ({' or '.join(WEIGHT_FILES)})")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"checkpoint {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                              "save it with tokenizer.save_pretrained(dir)")
    return path.resolve()


def weights_file(path: Path) -> Path:
    found = next((path / f for f in WEIGHT_FILES if (path / f).exists()), None)
    if found is None:
        raise CheckpointError(f"checkpoint {path}: no weights ({' or '.join(WEIGHT_FILES)})")
    return found


def checkpoint_info(path: Path, full_sha256: bool = False) -> dict[str, Any]:
    """Identity of a checkpoint: `distilray.json` fields plus a short hash of the weights
    (and the whole one as `sha256` when asked: the weights are hashed once either way)."""
    meta = read_meta(path)
    digest = sha256_file(weights_file(path))
    sha = digest[:12]
    run = meta.get("run_name") or path.name
    step = meta.get("step")
    ident = f"{run}@step{step}:{sha}" if step is not None else f"{run}:{sha}"
    info = {"id": ident, "sha256_12": sha, "path": str(path), **{
        k: meta[k] for k in ("run_name", "step", "epoch", "metrics", "model_name", "max_length")
        if k in meta}}
    return {**info, "sha256": digest} if full_sha256 else info


def checkpoint_size(path: str | Path) -> int:
    """Bytes a server loads: every file of the checkpoint except the optimizer state."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name not in NOT_SERVED)


def load_for_inference(path: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a checkpoint directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot load ({exc})") from None
    return model, tokenizer
