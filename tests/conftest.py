"""Shared test setup: offline Hugging Face, a per-machine model cache, paths to ../shared data."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

# The Hub is unreachable here: fail fast instead of retrying for ~50 s per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISTILRAY_CACHE", str(Path(tempfile.gettempdir()) / "distilray-test-cache"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DISTILRAY_SHARED_DATA", REPO.parent / "shared" / "data"))


def free_port() -> int:
    """A TCP port free on the loopback now (Serve, MLflow and Ray servers of the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_checkpoint(path: Path, run_name: str, seed: int = 1, max_length: int = 64) -> Path:
    """A random-init `tiny` classifier saved as a distilray checkpoint (for fast serve/predict tests)."""
    import json

    from distilray.model import load_classifier, load_tokenizer, resolve_model

    source = resolve_model("tiny")
    load_classifier(source, ["negative", "positive"], seed=seed).save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    (path / "distilray.json").write_text(json.dumps(
        {"run_name": run_name, "step": 1, "epoch": 1, "metrics": {}, "model_name": "tiny",
         "max_length": max_length, "label_names": ["negative", "positive"]}))
    return path


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (tests read real data from ../shared/data)")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `quiet` run first: they time what a user sees on an idle machine, and later
    the session's Ray instance and the leftovers of other tests share the 2 cores with them
    (the quickstart took 187 s alone, 240-317 s late in a full run)."""
    items.sort(key=lambda item: item.get_closest_marker("quiet") is None)


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    return shared_path("sst2")


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    return shared_path("imdb")


@pytest.fixture(scope="session")
def ray_4_cpus():
    """A real local Ray (4 logical CPUs on this 2-core machine) shared by every Ray test."""
    import ray

    from distilray.runtime import init_local_ray, use_serve_high_throughput

    if ray.is_initialized():
        ray.shutdown()
    use_serve_high_throughput()  # as distilray's own local Ray instances (serve, train) do
    # "local": its own instance even beside a `ray start` cluster or a stale record of one;
    # with a dashboard (Train polls the State API) that its processes find beside other Ray
    # instances on this host (other test sessions, the `ray start` of test_fresh_env).
    init_local_ray(num_cpus=4, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sst2_run(ray_4_cpus, sst2_dir, tmp_path_factory) -> dict:
    """offline:minilm fine-tuned on 8k SST-2 sentences by 2 Ray Train workers (shared by tests).

    2 workers × batch 8 keep the global batch at 16 (batch 32 reached only 0.84 with 8k
    sentences). lr 1e-4, the 6-layer, 384-wide encoder's rate in the quickstart preset: 8k
    sentences (500 steps) reached 0.867 in 298 s, and its `sst2_student` kept 98.1% of it;
    lr 5e-5 needed 12k sentences (750 steps, ~390 s) for 0.860 (student: 97.6%).
    Not length-bucketed: bucketed, 12k at lr 5e-5 reached only 0.853.

    This is the run behind the accuracy tests of train, serve and distill; it takes minutes
    on 2 cores, so it is trained once per session.
    """
    from distilray.config import load_config
    from distilray.train.objective import Classification
    from distilray.train.run import run_training

    storage = tmp_path_factory.mktemp("sst2-runs")
    cfg = load_config(REPO / "configs" / "sst2.yaml", [
        f"data.dataset={sst2_dir}", "data.max_train_samples=8000", "train.num_workers=2",
        "train.batch_size=8", "train.lr=1.0e-4", "train.warmup_ratio=0.06", f"train.storage_path={storage}",
        "train.name=sst2-minilm", "train.log_every_steps=50", "train.max_failures=0"])
    return run_training(cfg, Classification())


@pytest.fixture(scope="session")
def sst2_checkpoint(sst2_run) -> str:
    """Path of the best checkpoint of `sst2_run` (Hugging Face format)."""
    return sst2_run["best_checkpoint"]


@pytest.fixture(scope="session")
def sst2_student(sst2_checkpoint, sst2_dir, tmp_path_factory) -> dict:
    """layers:3 of the SST-2 teacher, distilled with configs/distill.yaml (the distill and
    model-lifecycle tests share it: it takes minutes on 2 cores)."""
    from distilray.config import load_config
    from distilray.distill.objective import run_distillation

    storage = tmp_path_factory.mktemp("sst2-student")
    cfg = load_config(REPO / "configs" / "distill.yaml", [
        f"distill.teacher={sst2_checkpoint}", "distill.student=layers:3", f"data.dataset={sst2_dir}",
        "train.num_workers=2", f"train.storage_path={storage}", "train.log_every_steps=50",
        "train.max_failures=0", "train.name=kd"])
    return {"cfg": cfg, **run_distillation(cfg)}


@pytest.fixture(scope="module", autouse=True)
def no_serve_left_running():
    """Serve, and the HAProxy of its high-throughput mode (fixed ports 8404 and 9101), end with
    the module that started them: later modules start Serve on clusters of their own."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray import serve

    try:
        serve.shutdown()
    except Exception:  # Serve was never started on this cluster
        pass
