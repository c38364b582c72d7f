"""A real 2-node Ray cluster on this machine, driven the way a user drives it: `distilray
cluster up`, `ray job submit` of a training job whose two workers must land on different nodes,
a detached serve job answering over HTTP, then `distilray cluster down`.

Token auth is left as Ray's defaults set it (on); the test proves it is enforced and that the
job CLI gets through with the env file `cluster up` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from distilray.cluster import (
    ENV_FILE,
    auth_headers,
    cluster_down,
    cluster_up,
    list_nodes,
    node_alive,
    plan_nodes,
    read_token,
    resolve_auth,
)
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT_S = 300



def _client_env(state_dir: Path) -> dict[str, str]:
    """This shell after `source <dir>/env.sh`: RAY_ADDRESS, RAY_AUTH_MODE, the token path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for line in (state_dir / ENV_FILE).read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value
    return env


def _submit(env: dict[str, str], submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--submission-id", submission_id, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--", *entrypoint]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def _job_status(state, token: str | None, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(state.dashboard_url, headers=auth_headers(token) or None)
    return str(client.get_job_status(submission_id))


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


class Phases:
    """Wall time per phase, printed (pytest shows it on failure, or with -s)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()

    def done(self, what: str) -> None:
        now = time.monotonic()
        print(f"[multinode] {what}: {now - self.last:.0f}s (total {now - self.t0:.0f}s)", flush=True)
        self.last = now


# ~3 minutes on an idle 2-core machine; the limit leaves room for a loaded one.
@pytest.mark.timeout(600)
def test_two_node_cluster_trains_across_nodes_and_serves(tmp_path):
    phases = Phases()
    state_dir, results = tmp_path / "cluster", tmp_path / "results"
    # 3 CPUs per node, 2 per training worker: both workers never fit on one node, and each
    # node keeps 1 CPU for the Ray Data tasks that feed them.
    nodes = plan_nodes(workers=1, head_cpus=3, worker_cpus=3, object_store_mb=300)
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    state = None
    try:
        state = cluster_up(state_dir, nodes, timeout_s=180, environ=environ)
        phases.done("cluster up")
        token = read_token(resolve_auth(environ, Path.home()), environ)

        # Token auth is on by default, and enforced.
        assert state.auth_mode == "token" and token
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{state.dashboard_url}/api/v0/nodes", timeout=10)
        assert denied.value.code == 401
        alive = {n["node_id"]: n for n in list_nodes(state.dashboard_url, token)
                 if n["state"] == "ALIVE"}
        assert len(alive) == 2
        head_id = next(i for i, n in alive.items() if n["is_head_node"])
        worker_id = next(i for i, n in alive.items() if not n["is_head_node"])
        assert alive[head_id]["resources_total"]["distilray_head"] == 1
        assert alive[worker_id]["resources_total"]["distilray_worker_1"] == 1

        env = _client_env(state_dir)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"] == state.dashboard_url

        # --- training job, 2 workers that must span both nodes
        train_id = f"mn-train-{uuid.uuid4().hex[:8]}"
        proc = _submit(env, train_id, "distilray", "train", "--config", "configs/tiny.yaml",
                       "--workers", "2", "--name", "two-nodes", "--storage-path", str(results),
                       "--set", "train.cpus_per_worker=2", "--set", "train.torch_threads=1")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert _job_status(state, token, train_id) == "SUCCEEDED"
        # processes on the nodes resolve our cluster even with other Ray instances on the host
        assert "Found multiple active Ray instances" not in proc.stdout + proc.stderr
        phases.done("training job")

        run_dir = results / "two-nodes"
        summary = json.loads((run_dir / "result.json").read_text())
        workers = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line).get("event") == "worker"]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert {w["node_id"] for w in workers} == {head_id, worker_id}, "one worker per node"

        best = Path(summary["best_checkpoint"])
        assert best.is_dir() and best.parent == run_dir
        assert (best / "config.json").exists() and (best / "model.safetensors").exists()
        from transformers import pipeline

        clf = pipeline("text-classification", model=str(best))
        assert clf("a wonderful film")[0]["label"] in ("negative", "positive")

        # --- batch prediction job: model actors on both nodes (2 CPUs each, 3 per node)
        inp = tmp_path / "predict-in"
        inp.mkdir()
        import pyarrow as pa
        import pyarrow.parquet as pq

        from distilray.data import generate_synthetic_sentiment

        rows = generate_synthetic_sentiment(1600, seed=9)
        for i in range(8):
            pq.write_table(rows.slice(i * 200, 200).append_column("id", pa.array(range(i * 200, i * 200 + 200))),
                           inp / f"part{i}.parquet")
        predict_id = f"mn-predict-{uuid.uuid4().hex[:8]}"
        proc = _submit(env, predict_id, "distilray", "predict", "--checkpoint", str(best), "--input",
                       str(inp), "--output", str(results / "predictions"), "--set",
                       "predict.min_actors=2", "--set", "predict.max_actors=2", "--set",
                       "predict.cpus_per_actor=2", "--set", "predict.batch_size=32")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert _job_status(state, token, predict_id) == "SUCCEEDED"
        predicted = json.loads((results / "predictions" / "_SUCCESS.json").read_text())
        assert predicted["rows"] == predicted["predicted"] == 1600
        assert set(predicted["rows_per_node"]) == {head_id, worker_id}, predicted["rows_per_node"]
        assert sum(predicted["rows_per_node"].values()) == 1600
        phases.done("batch predict job")

        # --- detached serve job: returns once healthy, the app keeps serving
        port = free_port()
        serve_id = f"mn-serve-{uuid.uuid4().hex[:8]}"
        proc = _submit(env, serve_id, "distilray", "serve", "--checkpoint", str(best),
                       "--detach", "--host", "127.0.0.1", "--port", str(port))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert _job_status(state, token, serve_id) == "SUCCEEDED"
        phases.done("serve job")

        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/readyz", timeout=30) as resp:
            assert resp.status == 200
        out = _post(f"{base}/v1/classify", {"texts": ["a great movie", "a dull, awful mess"]})
        preds = out["predictions"]
        assert len(preds) == 2
        for p in preds:
            assert p["label"] in ("negative", "positive")
            assert abs(sum(p["probabilities"].values()) - 1.0) < 1e-4
            assert p["score"] == max(p["probabilities"].values())
        assert out["checkpoint"].startswith("two-nodes@")
    finally:
        stopped = cluster_down(state_dir, purge=True)
        phases.done("cluster down")
    assert stopped is not None and state is not None
    assert not any(node_alive(n) for n in state.nodes)
    from distilray.cluster import _session_members

    assert all(_session_members(n.pid) == [] for n in state.nodes), "leftover Ray processes"
    assert not Path(state.temp_dir).exists() and not state_dir.exists()
