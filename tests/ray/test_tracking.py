"""Experiment tracking against a real `mlflow server` on loopback (sqlite, artifacts in a temp dir).

One server for the module: a tiny train (+ its evaluation), a 2-trial tune and two registered
versions are checked through `MlflowClient`; the last test stops the server and trains again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distilray import tracking
from distilray.config import load_config
from distilray.train.objective import Classification
from distilray.train.run import read_metrics, run_training
from tests.conftest import free_port, save_tiny_checkpoint
from tests.unit.test_tracking import read_event_scalars

pytestmark = pytest.mark.ray

mlflow = pytest.importorskip("mlflow")



def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mlflow.cli import cli; cli()"]
    with open(root / "server.log", "w") as out:
        proc = subprocess.Popen(
            [*cmd, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not healthy(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"uri": uri, "proc": proc}
    stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn workers (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def tiny_cfg(tmp_path, name, *extra):
    return load_config(None, [
        "model.name=tiny", "model.dropout=0.0", "data.dataset=synthetic:sentiment",
        "data.synthetic_size=200", "data.max_length=32", "train.lr=1e-3", "train.max_steps=6",
        "train.eval_every_steps=3", "train.log_every_steps=1", "train.max_failures=0",
        f"train.storage_path={tmp_path}", f"train.name={name}", *extra])


def test_train_and_evaluate_runs_and_registered_versions(ray_4_cpus, mlflow_server, tmp_path):
    from mlflow import MlflowClient


    uri = mlflow_server["uri"]
    client = MlflowClient(uri)
    cfg = tiny_cfg(tmp_path, "tracked", f"track.mlflow={uri}", "track.experiment=t-train")
    result = run_training(cfg, Classification())
    run_dir = Path(result["run_dir"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "t-train"
    # params: the flattened resolved config
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"] == "tiny"
    assert run.data.params["train.max_steps"] == "6"
    tags = run.data.tags
    assert tags["distilray.run_dir"] == str(run_dir) and tags["distilray.kind"] == "train"
    assert tags["distilray.data_source"].startswith("synthetic:sentiment") and tags["distilray.version"]
    assert tags["distilray.best_checkpoint"] == result["best_checkpoint"]
    # per-step and eval metrics: the same numbers as metrics.jsonl, at the same steps
    records = read_metrics(run_dir)
    steps = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(r["step"], r["loss"]) for r in steps]
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(run.info.run_id, "samples_per_s")) == 6
    accuracy = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["step"], r["eval_accuracy"]) for r in evals]
    assert [m.step for m in accuracy] == [3, 6]
    assert run.data.metrics["best_eval_accuracy"] == result["best_metrics"]["eval_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "result.json"} <= artifacts
    # the run directory says which MLflow run it is; TensorBoard files from rank 0
    assert json.loads((run_dir / "result.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert tracking.find_run_id(run_dir) == tracking.find_run_id(result["best_checkpoint"]) \
        == run.info.run_id
    scalars = read_event_scalars(run_dir / tracking.TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["eval/eval_accuracy"]] == [3, 6]

    # promote: evaluate (its own run, eval.json as an artifact, linked to the training run),
    # then the bundle is registered as an MLflow model version with the same alias
    from distilray.cli import main
    from distilray.store import ModelStore

    store = tmp_path / "store"
    assert main(["promote", "--checkpoint", result["best_checkpoint"], "--to", str(store),
                 "--name", "tiny-clf", "--eval-data", "synthetic:sentiment",
                 "--set", f"track.mlflow={uri}", "--set", "track.experiment=t-train",
                 "--set", "data.synthetic_size=200", "--set", "data.max_length=32"]) == 0
    evals_logged = client.search_runs([run.info.experiment_id], "tags.`distilray.kind` = 'evaluate'")
    (ev,) = evals_logged
    eval_json = ModelStore(str(store)).read_json("tiny-clf", "v1", "eval.json")
    assert ev.info.status == "FINISHED" and ev.data.metrics["eval_accuracy"] == eval_json["eval_accuracy"]
    assert ev.data.tags["distilray.source_run_id"] == run.info.run_id
    assert ev.data.tags["distilray.data_sha256"] == eval_json["data"]["sha256"]
    assert {"eval.json", "eval.md"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    lineage = ModelStore(str(store)).read_json("tiny-clf", "v1", "lineage.json")
    assert lineage["mlflow_run_id"] == run.info.run_id
    prod = client.get_model_version_by_alias("tiny-clf", "production")
    assert prod.version == "1" and prod.tags["distilray.version"] == "v1"
    assert prod.tags["distilray.bundle"] == f"{store}/tiny-clf/v1"
    assert prod.run_id == run.info.run_id and prod.source == f"runs:/{run.info.run_id}/bundle"
    copied = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert "bundle/config.json" in copied and "bundle/model.safetensors" not in copied
    # a second version: the alias follows it
    bundle = save_tiny_checkpoint(tmp_path / "other" / "v2", "v2")
    v2 = tracking.register_model_version(uri, "tiny-clf", str(bundle), "production",
                                         {"distilray.version": "v2"})
    assert v2 == "2"
    prod = client.get_model_version_by_alias("tiny-clf", "production")
    assert prod.version == "2" and prod.tags["distilray.version"] == "v2"


def test_tune_is_a_parent_run_with_a_child_run_per_trial(ray_4_cpus, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from distilray.tune.search import run_tune

    uri = mlflow_server["uri"]
    client = MlflowClient(uri)
    cfg = load_config(None, [
        "model.name=tiny", "data.dataset=synthetic:sentiment", "data.synthetic_size=200",
        "data.max_length=32", "train.max_steps=4", "train.eval_every_steps=2",
        "train.log_every_steps=1", "train.max_failures=0", "tune.search_alg=grid",
        "tune.scheduler=fifo", "tune.num_samples=1", "tune.max_concurrent_trials=2",
        f"tune.storage_path={tmp_path}", "tune.name=search", f"track.mlflow={uri}",
        "track.experiment=t-tune"],
        values={"tune.space": {"train.lr": {"type": "grid", "values": [1e-3, 3e-3]}}})
    summary = run_tune(cfg)
    assert summary["trials"] == 2 and summary["errors"] == 0
    parent_id = tracking.read_tracking(tmp_path / "search")["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["distilray.kind"] == "tune"
    assert json.loads(parent.data.params["space.train.lr"])["values"] == [1e-3, 3e-3]
    assert parent.data.params["tune.metric"] == "eval_accuracy"
    assert parent.data.params["tune.mode"] == "max"
    assert parent.data.metrics["best_eval_accuracy"] == summary["best"]["metrics"]["eval_accuracy"]
    assert parent.data.tags["distilray.best_trial"] == summary["best"]["trial_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    assert sorted(c.data.params["train.lr"] for c in children) == ["0.001", "0.003"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["distilray.kind"] == "trial"
        run_dir = Path(child.data.tags["distilray.run_dir"])
        assert run_dir.parent == tmp_path / "search" / "runs"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3, 4]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "eval_accuracy")] == [2, 4]
        assert list(run_dir.glob(f"{tracking.TENSORBOARD_DIR}/events.out.tfevents.*"))
    assert tracking.find_run_id(tmp_path / "search" / "best") in {c.info.run_id for c in children}


def test_server_down_training_finishes_with_one_warning(ray_4_cpus, mlflow_server, tmp_path,
                                                         monkeypatch, caplog):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    uri = mlflow_server["uri"]
    stop(mlflow_server["proc"])
    assert not healthy(uri)
    caplog.set_level(logging.WARNING)
    timings = {}
    for name, extra in (("untracked", []), ("down", [f"track.mlflow={uri}"])):
        start = time.monotonic()
        result = run_training(tiny_cfg(tmp_path, name, *extra), Classification())
        timings[name] = time.monotonic() - start
        assert result["best_checkpoint"] and "mlflow_run_id" not in result
    print("wall time s (untracked, server down):", {k: round(v, 1) for k, v in timings.items()})
    warnings = [r for r in caplog.records if r.name.startswith(("distilray.tracking", "mlflow"))
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "unreachable" in warnings[0].getMessage() and "'down'" in warnings[0].getMessage()
    # the probe is the only cost; MLflow's default retries would add minutes (7 retries, backoff
    # 2 s..128 s). 1.5x + 3 s leaves room for other jobs on shared CPUs.
    assert timings["down"] < 1.5 * timings["untracked"] + 3.0, timings
    assert not (tmp_path / "down" / tracking.TRACKING_FILE).exists()
    assert list((tmp_path / "down" / tracking.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
