"""Node loss on a real multi-node cluster on this machine (`distilray.cluster`: a head and two
worker nodes, each its own `ray start` session). A node is lost the way a spot reclaim loses
it: every process of its session SIGKILLed at once (`cluster.lose_node`), no drain. It comes
back with `cluster.rejoin_node` (same resources, a new Ray node id).

All tests share one cluster (starting one costs ~20 s); every driver is a `distilray`
subprocess pointed at it through RAY_ADDRESS, as a user's would be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from distilray.checkpoints import METRICS_FILE
from distilray.cluster import (
    ClusterState,
    cluster_down,
    cluster_up,
    list_nodes,
    lose_node,
    node_alive,
    plan_nodes,
    read_token,
    rejoin_node,
    resolve_auth,
)
from distilray.files import read_jsonl
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.nightly]


@dataclass
class Cluster:
    state_dir: Path
    environ: dict[str, str]

    @property
    def state(self) -> ClusterState:
        state = ClusterState.load(self.state_dir)
        assert state is not None
        return state

    def driver_env(self) -> dict[str, str]:
        """A shell that joined the cluster: RAY_ADDRESS (its GCS), auth mode and token path."""
        return {**self.environ, **self.state.client_env(), "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1"}

    def alive_node_ids(self, label: str) -> set[str]:
        token = read_token(resolve_auth(self.environ, Path.home()), self.environ)
        return {n["node_id"] for n in list_nodes(self.state.dashboard_url, token)
                if n["state"] == "ALIVE" and label in n.get("resources_total", {})}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU: Ray Data's tasks, drivers) + 2 worker nodes of 3 CPUs: a 2-CPU training
    worker fits only on a worker node, one per node, with a CPU left there for a Tune trial's
    driver or a Ray Data task."""
    state_dir = tmp_path_factory.mktemp("reliability") / "cluster"
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    environ["PYTHONPATH"] = str(REPO)  # the nodes' workers import this checkout's distilray
    nodes = plan_nodes(workers=2, head_cpus=1, worker_cpus=3, object_store_mb=200)
    started = time.monotonic()
    cluster_up(state_dir, nodes, timeout_s=180, environ=environ)
    print(f"[reliability] cluster up: {time.monotonic() - started:.0f}s", flush=True)
    try:
        yield Cluster(state_dir, environ)
    finally:
        state = cluster_down(state_dir, purge=True)
        assert state is not None and not any(node_alive(n) for n in state.nodes)


def _ensure_all_nodes(cluster: Cluster) -> None:
    """Bring back a node an earlier (failed) test left lost, so each test starts whole."""
    for node in cluster.state.nodes:
        if not node_alive(node):
            rejoin_node(cluster.state_dir, node.name, environ=cluster.environ)


def _records(run_dir: Path, event: str | None = None) -> list[dict]:
    rows = read_jsonl(run_dir / METRICS_FILE)
    return [r for r in rows if event is None or r.get("event") == event]


def _registered_step(run_dir: Path) -> int:
    """The latest checkpoint Ray Train's controller has registered (what a restart resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    try:
        names = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (ValueError, KeyError):
        return 0
    return max((int(n.removeprefix("checkpoint-step")) for n in names), default=0)


def _tiny_cfg(storage: Path, name: str, *extra: str):
    from distilray.config import load_config

    return load_config(None, [
        "model.name=tiny", "model.dropout=0.0", "data.dataset=synthetic:sentiment",
        "data.synthetic_size=600", "data.max_length=64", "train.lr=1e-3", "train.batch_size=16", "train.epochs=1",
        f"train.storage_path={storage}", f"train.name={name}", "train.eval_every_steps=10",
        "train.num_to_keep=2", "train.max_failures=1", *extra])


def _train_in_thread(cfg) -> tuple[threading.Thread, dict]:
    from distilray.train.objective import Classification
    from distilray.train.run import run_training

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = run_training(cfg, Classification())
        except Exception as exc:  # the test asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _fault_after_first_checkpoint(cfg, run_dir: Path, fault) -> tuple[Exception, int]:
    """Run `cfg`; once Ray has registered a checkpoint, apply `fault`; returns (error, step of
    the last checkpoint registered before the fault)."""
    thread, outcome = _train_in_thread(cfg)
    deadline = time.monotonic() + 240
    good = 0
    while time.monotonic() < deadline and not good and thread.is_alive():
        good = _registered_step(run_dir)
        time.sleep(0.05)
    assert good, f"no checkpoint was registered: {outcome}"
    fault()
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" in outcome, f"the run did not fail: {outcome}"
    return outcome["error"], _registered_step(run_dir)  # one more may have landed before the fault


def _assert_loads(checkpoint: Path) -> None:
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(checkpoint))
    assert {o["label"] for o in clf(["a wonderful film", "a dull mess"])} <= {"negative", "positive"}


@pytest.mark.timeout(900)
def test_checkpoint_writes_to_full_or_read_only_storage_fail_cleanly_and_resume(ray_4_cpus, tmp_path):
    from distilray.checkpoints import checkpoint_name
    from distilray.errors import StorageError
    from tests.unit.test_storage_faults import fill, mounted_tmpfs, remount

    mount = mounted_tmpfs(tmp_path / "fs", "160m")  # a tiny checkpoint is 25 MB
    storage = next(mount)
    try:
        t0 = time.monotonic()
        # --- full disk: the next checkpoint (25 MB) does not fit, log lines still do
        run_dir = storage / "full"
        cfg = _tiny_cfg(storage, "full")
        filler: list[Path] = []
        error, good = _fault_after_first_checkpoint(
            cfg, run_dir, lambda: filler.append(fill(storage, leave=256 * 1024)))
        assert isinstance(error, StorageError), repr(error)
        message = str(error)
        assert "\n" not in message
        failed = re.fullmatch(rf"training run 'full' failed: cannot write checkpoint {run_dir}/"
                              r"(checkpoint-step\d{7}): the disk is full \(No space left on device\); "
                              r"what was there before is unchanged", message)
        assert failed, message
        assert not (run_dir / failed.group(1)).exists(), "the half-written checkpoint was removed"
        assert int(failed.group(1).removeprefix("checkpoint-step")) > good
        _assert_loads(run_dir / checkpoint_name(good))
        # Ray Train's restarts failed at once (the fault is recorded): none trained on.
        assert _records(run_dir, "restored") == []
        # space freed: the same command resumes from the last good checkpoint and finishes
        filler[0].unlink()
        thread, outcome = _train_in_thread(cfg)
        thread.join(timeout=300)
        assert "result" in outcome, outcome
        restored = _records(run_dir, "restored")
        assert [r["step"] for r in restored] == [good]
        assert max(r["step"] for r in _records(run_dir, "train")) == outcome["result"]["total_steps"]
        t_full = time.monotonic() - t0

        # --- read-only storage
        run_dir = storage / "ro"
        error, good = _fault_after_first_checkpoint(
            _tiny_cfg(storage, "ro", "train.max_steps=20"), run_dir, lambda: remount(storage, "ro"))
        assert isinstance(error, StorageError), repr(error)
        # the first refused write is ours (checkpoint, training log) or Ray's (its checkpoint
        # snapshot in the run directory)
        assert re.fullmatch(rf"training run 'ro' failed: cannot write ((checkpoint|training log) )?"
                            rf"{run_dir}(/\S+)?: the file system is read-only \(Read-only file system\); "
                            r"what was there before is unchanged", str(error)), str(error)
        _assert_loads(run_dir / checkpoint_name(good))
        print(f"[reliability] storage faults: full disk + resume {t_full:.0f}s, read-only "
              f"{time.monotonic() - t0 - t_full:.0f}s", flush=True)
    finally:
        mount.close()


TRAIN_ARGS = [
    "--set", "model.name=tiny", "--set", "model.dropout=0.0",
    "--set", "data.dataset=synthetic:sentiment", "--set", "data.synthetic_size=1200",
    "--set", "data.max_length=64", "--set", "train.lr=1e-3", "--set", "train.epochs=2",
    "--set", "train.scheduler=constant",
    "--set", "train.batch_size=8", "--set", "train.num_workers=2",
    "--set", "train.cpus_per_worker=2", "--set", "train.torch_threads=1",
    "--set", "train.eval_every_steps=10", "--set", "train.log_every_steps=1",
    "--set", "train.max_failures=4", "--set", "train.num_to_keep=3",
]
TRAIN_STEPS = 2 * (1080 // 16)
ACCURACY_NOISE = 0.05
"""|final accuracy − undisturbed| allowed: 6 of the 120 validation rows. With dropout off, the
same rows per step and restores from exact weights + optimizer state, the runs differ only in
float summation order (DDP over 2 ranks vs 1 rank accumulating 2 micro-batches)."""


def _train(cluster: Cluster, storage: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distilray", "train", "--name", name, "--storage-path", str(storage),
           *TRAIN_ARGS, *extra]
    log = open(storage / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=cluster.driver_env(), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.mark.timeout(900)
def test_elastic_training_survives_node_loss_and_grows_back(cluster, tmp_path):
    _ensure_all_nodes(cluster)
    t0 = time.monotonic()
    steady = _train(cluster, tmp_path, "steady")
    _wait(steady, tmp_path / "steady.log", 400)
    t_steady = time.monotonic() - t0

    run_dir = tmp_path / "elastic"
    proc = _train(cluster, tmp_path, "elastic", "--set", "train.min_workers=1",
                  "--set", "train.elastic_resize_interval_s=5")
    deadline = time.monotonic() + 300
    lost_at = registered = None
    while time.monotonic() < deadline and lost_at is None:
        assert proc.poll() is None, (tmp_path / "elastic.log").read_text()[-4000:]
        steps = [r["step"] for r in _records(run_dir, "train")]
        latest = _registered_step(run_dir)
        if steps and latest and steps[-1] >= latest + 3:
            lose_node(cluster.state_dir, "worker-2")
            lost_at, registered = steps[-1], latest
        time.sleep(0.05)
    assert lost_at is not None, "training never reached the point where the node is lost"
    # The run continues on the one worker left, then the node comes back.
    while time.monotonic() < deadline and not any(r.get("workers") == 1 for r in _records(run_dir, "restored")):
        assert proc.poll() is None, (tmp_path / "elastic.log").read_text()[-4000:]
        time.sleep(0.2)
    shrunk = [r for r in _records(run_dir, "restored") if r.get("workers") == 1]
    assert shrunk, "the run did not continue on the remaining worker"
    rejoin_node(cluster.state_dir, "worker-2", environ=cluster.environ)
    _wait(proc, tmp_path / "elastic.log", max(60.0, deadline - time.monotonic() + 200))
    t_total = time.monotonic() - t0

    restored = _records(run_dir, "restored")
    assert restored[0]["workers"] == 1 and restored[0]["step"] >= registered > 0, (restored, registered)
    assert restored[0]["step"] <= lost_at
    grown = [r for r in restored if r["workers"] == 2]
    assert grown, f"the run did not grow back to 2 workers: {restored}"
    # Every step is trained on the same rows as the undisturbed run: the loss of each step
    # after each restart matches, and so does the final accuracy.
    ref = {r["step"]: r["loss"] for r in _records(tmp_path / "steady", "train")}
    records = _records(run_dir)
    for event in restored:
        after = [r for r in records[records.index(event):] if r["event"] == "train"][:3]
        assert after[0]["step"] == event["step"] + 1, "the step counter continues from the checkpoint"
        for r in after:
            assert abs(r["loss"] - ref[r["step"]]) < 2e-3, (event, r, ref[r["step"]])
    assert max(r["step"] for r in records if r["event"] == "train") == TRAIN_STEPS
    steady_result = json.loads((tmp_path / "steady" / "result.json").read_text())
    elastic_result = json.loads((run_dir / "result.json").read_text())
    acc_steady = steady_result["final_metrics"]["eval_accuracy"]
    acc_elastic = elastic_result["final_metrics"]["eval_accuracy"]
    assert acc_steady >= 0.7, f"the tiny task must be learnt for the comparison to mean anything: {acc_steady}"
    assert abs(acc_elastic - acc_steady) <= ACCURACY_NOISE, (acc_elastic, acc_steady)
    workers = _records(run_dir, "worker")
    assert len({w["node_id"] for w in workers}) == 3, "first two nodes, then the rejoined one"
    print(f"[reliability] training: steady {t_steady:.0f}s, elastic run {t_total - t_steady:.0f}s; "
          f"accuracy {acc_steady:.3f} → {acc_elastic:.3f}; restored at "
          f"{[(r['step'], r['workers']) for r in restored]}", flush=True)


TUNE_YAML = """# 2 trials at once, one 2-CPU worker each: one trial per worker node
model: {name: tiny, dropout: 0.0}
data: {dataset: 'synthetic:sentiment', synthetic_size: 600, max_length: 64}
train: {lr: 1.0e-3, batch_size: 16, epochs: 2, cpus_per_worker: 2, torch_threads: 1,
        eval_every_steps: 10, log_every_steps: 1, max_failures: 4, num_to_keep: 2}
tune:
  space:
    train.lr: {type: grid, values: [1.0e-3, 3.0e-4]}
  search_alg: grid
  scheduler: fifo
  num_samples: 1
  max_concurrent_trials: 2
"""


@pytest.mark.timeout(900)
def test_tune_search_loses_a_node_and_the_trial_resumes_from_its_checkpoint(cluster, tmp_path):
    from distilray.tune.summary import load_experiment_summary

    _ensure_all_nodes(cluster)
    t0 = time.monotonic()
    (tmp_path / "tune.yaml").write_text(TUNE_YAML)
    log = tmp_path / "tune.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distilray", "tune", "--config", str(tmp_path / "tune.yaml"),
                                 "--storage-path", str(tmp_path), "--name", "search"],
                                env=cluster.driver_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    exp_dir = tmp_path / "search"
    lost_node = cluster.alive_node_ids("distilray_worker_2")
    victim = registered = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and victim is None:
        assert proc.poll() is None, log.read_text()[-4000:]
        for run_dir in sorted((exp_dir / "runs").glob("*")) if (exp_dir / "runs").exists() else []:
            workers = _records(run_dir, "worker")
            steps = [r["step"] for r in _records(run_dir, "train")]
            latest = _registered_step(run_dir)
            if workers and workers[-1]["node_id"] in lost_node and latest and steps and steps[-1] >= latest + 2:
                victim, registered = run_dir, latest
                lose_node(cluster.state_dir, "worker-2")
                break
        time.sleep(0.1)
    assert victim is not None, "no trial ran on worker-2 past a checkpoint"
    time.sleep(5)
    rejoin_node(cluster.state_dir, "worker-2", environ=cluster.environ)
    try:
        proc.wait(timeout=max(60.0, deadline - time.monotonic() + 200))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]

    restored = _records(victim, "restored")
    assert restored and restored[0]["step"] >= registered > 0, (restored, registered)
    after = [r["step"] for r in _records(victim)[_records(victim).index(restored[0]):] if r["event"] == "train"]
    assert after[0] == restored[0]["step"] + 1, "the trial continued from its checkpoint, not from step 0"
    exp = load_experiment_summary(exp_dir)
    assert sorted(t.status for t in exp.trials) == ["done", "done"], [(t.trial_id, t.status) for t in exp.trials]
    # the victim was retried; the other trial too only if its driver (Tune's trial actor,
    # placed by Ray anywhere) happened to live on the lost node
    retried = [t for t in exp.trials if t.restarts]
    assert victim.name in [t.trial_id for t in retried], [(t.trial_id, t.restarts) for t in exp.trials]
    report = (exp_dir / "report.md").read_text()
    # one line names every retried trial, in trial order: the victim may follow the other
    retried_line = next((line for line in report.splitlines() if line.startswith(
        "Retried from a checkpoint after a failure (a lost worker, node or trial driver): ")), "")
    assert f"trial {victim.name} (1×)" in retried_line, report
    print(f"[reliability] tune: {time.monotonic() - t0:.0f}s; trial {victim.name} restored at "
          f"{[r['step'] for r in restored]} after losing its node at checkpoint {registered}", flush=True)


def _serve_replicas(cluster: Cluster, app: str) -> dict[str, list[dict]]:
    """RUNNING replicas of `app` per deployment, as the dashboard's Serve REST API lists them
    (each with its node_id)."""
    from distilray.cluster import _http_json

    token = read_token(resolve_auth(cluster.environ, Path.home()), cluster.environ)
    details = _http_json(f"{cluster.state.dashboard_url}/api/serve/applications/", token, timeout=15)
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    return {name: [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
            for name, d in deployments.items()}


class _Load:
    """Closed-loop HTTP clients in threads until stopped: every answer's status, in order
    (-1 for a connection error)."""

    def __init__(self, url: str, clients: int):
        import requests

        self.url, self.codes, self.stop = url, [], threading.Event()

        def client() -> None:
            with requests.Session() as session:
                while not self.stop.is_set():
                    try:
                        r = session.post(f"{url}/v1/classify", json={"text": "a gripping film"},
                                         timeout=30)
                        self.codes.append(r.status_code)
                    except requests.RequestException:
                        self.codes.append(-1)

        self.threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.timeout(600)
def test_serve_loses_a_node_under_load_and_replaces_its_replica_when_it_returns(cluster, tmp_path):
    """Two 2-CPU Classifier replicas, one per worker node (a 3-CPU node holds one); the node
    with a Classifier and no Ingress is lost under load, then comes back."""
    from collections import Counter

    from distilray.serve.app import CLASSIFIER_NAME, INGRESS_NAME
    from tests.conftest import free_port, save_tiny_checkpoint

    _ensure_all_nodes(cluster)
    t0 = time.monotonic()
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", "tiny-node-loss")
    port = free_port()
    serve = [sys.executable, "-m", "distilray", "serve", "--checkpoint", str(checkpoint),
             "--port", str(port), "--set", "serve.app_name=nodeloss"]
    proc = subprocess.run(serve + ["--detach", "--set", "serve.min_replicas=2", "--set",
                                   "serve.max_replicas=2", "--set", "serve.num_cpus=2", "--set",
                                   "serve.health_check_period_s=1"],
                          env=cluster.driver_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    try:
        replicas = _serve_replicas(cluster, "nodeloss")
        classifier_nodes = {r["node_id"] for r in replicas[CLASSIFIER_NAME]}
        ingress_nodes = {r["node_id"] for r in replicas[INGRESS_NAME]}
        workers = {name: cluster.alive_node_ids(f"distilray_worker_{i}")
                   for i, name in ((1, "worker-1"), (2, "worker-2"))}
        assert len(classifier_nodes) == 2 and classifier_nodes <= set().union(*workers.values()), replicas
        victim = next(name for name, ids in workers.items()
                      if ids & classifier_nodes and not ids & ingress_nodes)
        url = f"http://127.0.0.1:{port}"
        with _Load(url, clients=8) as load:
            time.sleep(3)
            before = len(load.codes)
            lose_node(cluster.state_dir, victim)
            lost_at = len(load.codes)
            time.sleep(10)  # the survivor serves alone: no CPUs left anywhere for a replacement
            during = len(load.codes) - lost_at
            assert len(_serve_replicas(cluster, "nodeloss")[CLASSIFIER_NAME]) == 1
            rejoin_node(cluster.state_dir, victim, environ=cluster.environ)
            back = cluster.alive_node_ids(f"distilray_worker_{victim[-1]}")
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                nodes = {r["node_id"] for r in _serve_replicas(cluster, "nodeloss")[CLASSIFIER_NAME]}
                if len(nodes) == 2 and nodes & back:
                    break
                time.sleep(1)
            else:
                raise AssertionError(f"no replacement replica on the rejoined node: {nodes}")
            replaced_at = len(load.codes)
            time.sleep(3)
        codes = Counter(load.codes)
        assert before > 20 and during > 20 and len(load.codes) - replaced_at > 20, (before, during)
        assert set(codes) <= {200, 503}, codes
        assert codes[200] / len(load.codes) >= 0.99, codes
        print(f"[reliability] serve: {time.monotonic() - t0:.0f}s; {dict(codes)}; lost {victim}, "
              f"{during} answers while it was gone", flush=True)
    finally:
        subprocess.run(serve + ["--stop"], env=cluster.driver_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
