"""`distilray quickstart`: train → search → serve → classify, offline, on the demo corpus.

A demo program (like nanoGPT's sample.py), so it prints its own results table; `cli` imports
this module only when the quickstart runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from importlib import resources

import ray

from distilray.client import classify
from distilray.config import Config, apply_overrides, load_config
from distilray.distill.objective import objective_for
from distilray.runtime import connect_ray
from distilray.serve.lifecycle import serve_until_interrupted, shutdown_server, start_server
from distilray.train.run import run_training
from distilray.tune.search import run_tune

log = logging.getLogger(__name__)

SENTENCES = [
    "i loved the acting , and the soundtrack was wonderful .",
    "the plot was dull and the ending utterly predictable .",
    "the film was not boring at all .",
    "everyone will find the story charming , but the pacing was painful .",
]


def preset_path() -> str:
    return str(resources.files("distilray") / "presets" / "quickstart.yaml")


def default_config(overrides: list[str] | None = None) -> Config:
    return load_config(preset_path(), overrides or [])


def _banner(step: int, text: str, started: float) -> None:
    log.info("── quickstart %d/4 (%.0fs): %s", step, time.time() - started, text)


def run_quickstart(cfg: Config | None = None, keep_serving: bool = False) -> dict:
    """Fine-tune with Ray Train, search lr with Ray Tune (ASHA), serve the best, classify."""
    cfg = cfg or default_config()
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=f"quickstart-{stamp}"))

    # Logical CPUs beyond the cores let two trials overlap their start-up (Ray, model load).
    connect_ray(min_cpus=2 * cfg.tune.max_concurrent_trials * cfg.train.cpus_per_worker)
    _banner(1, f"fine-tune {cfg.model.name} on {cfg.data.dataset} with Ray Train", started)
    trained = run_training(cfg, objective_for(cfg))

    _banner(2, "search the learning rate with Ray Tune (ASHA)", started)
    search_cfg = apply_overrides(cfg, {
        "tune.name": f"quickstart-search-{stamp}", "train.epochs": 2,
        "data.synthetic_size": max(200, cfg.data.synthetic_size // 2)})
    searched = run_tune(search_cfg)
    best_dir = f"{searched['experiment']}/best"

    _banner(3, f"serve {best_dir} with Ray Serve", started)
    url = start_server(cfg, best_dir)
    predictions: list = []
    try:
        _banner(4, f"classify over HTTP: POST {url}/v1/classify", started)
        predictions = classify(url, SENTENCES)
        print("\nquickstart results")
        print(f"  train run      {trained['run_dir']}  eval_accuracy "
              f"{trained['best_metrics']['eval_accuracy']:.3f}")
        best = searched["best"]
        print(f"  search         {searched['trials']} trials; best lr {best['params'].get('train.lr'):.0e} "
              f"eval_accuracy {best['metrics']['eval_accuracy']:.3f}")
        print(f"  report         {searched['report']}")
        print(f"  served at      {url}  (checkpoint {best_dir})")
        for text, p in zip(SENTENCES, predictions, strict=True):
            print(f"  {p['label']:>8} {p['score']:.2f}  {text}")
        print(f"  finished in {time.time() - started:.0f}s")
        if keep_serving:
            print(f"\nstill serving at {url} — try: curl -s {url}/v1/classify -H 'Content-Type: "
                  "application/json' -d '{\"text\": \"a wonderful film\"}'   (Ctrl-C stops)")
            serve_until_interrupted(cfg)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_server(cfg)
        ray.shutdown()
    return {"train": trained, "tune": searched, "url": url, "predictions": predictions}
