"""`distilray quickstart`: the whole flow offline on the built-in demo corpus."""

from __future__ import annotations

import logging
import time
from importlib import resources

from distilray.config import Config, load_config

log = logging.getLogger(__name__)


def preset_path() -> str:
    return str(resources.files("distilray") / "presets" / "quickstart.yaml")


def default_config(overrides: list[str] | None = None) -> Config:
    return load_config(preset_path(), overrides or [])


def run_quickstart(cfg: Config | None = None, keep_serving: bool = False) -> None:
    """Load data and model; later stages (train, tune, serve) are added as they land."""
    from distilray.data import load_splits
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    if cfg is None or cfg == Config():
        cfg = default_config()
    t0 = time.time()
    splits = load_splits(cfg.data, cfg.model.num_labels)
    log.info("data: %s — %d train / %d validation rows", splits.source, splits.train.num_rows,
             splits.eval.num_rows)
    source = resolve_model(cfg.model.name, cfg.model.cache_dir)
    tokenizer = load_tokenizer(source)
    model = load_classifier(source, cfg.model.label_names, seed=cfg.train.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s (%s, %.1fM parameters, vocab %d) loaded in %.1fs", cfg.model.name,
             source.path, n_params / 1e6, tokenizer.vocab_size, time.time() - t0)
