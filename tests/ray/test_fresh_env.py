"""The README's commands on a fresh machine: no RAY_ADDRESS, a private HOME, as a user runs them.

- `distilray serve --detach` starts a Ray head of its own that outlives the command, answers
  one request, and `distilray serve --stop` leaves no process it started behind;
- `distilray train` starts its own Ray instance whether or not a `ray start` cluster runs on
  the machine or a killed one left Ray's `ray_current_cluster` record behind.

Every command runs in a subprocess whose environment has no RAY_ADDRESS; the test stops
exactly what it started (by session id), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from distilray.config import load_config
from distilray.serve.app import full_scale_cpus
from tests.conftest import free_port, save_tiny_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAY_RECORD = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"



def fresh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """os.environ without RAY_ADDRESS or Ray auth settings, with a private HOME (the model
    cache, DISTILRAY_CACHE, is kept)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_AUTH")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), **extra}


def distilray(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distilray", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, timeout_s: float = 20.0) -> None:
    """SIGKILL every process of a session this test started, until none is left."""
    deadline = time.monotonic() + timeout_s
    while (members := session_members(sid)) and time.monotonic() < deadline:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not session_members(sid), f"session {sid} survived SIGKILL"


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny-ckpt", "fresh")


def test_serve_detach_then_stop_without_ray_address(tmp_path, tiny_checkpoint):
    state_dir = tmp_path / "serve-state"
    env = fresh_env(tmp_path, DISTILRAY_SERVE_DIR=str(state_dir))
    port = free_port()
    # The default 1-CPU Classifier, two replicas from the start: the head `--detach` starts
    # holds every replica (2 x 1 CPU + the Ingress do not fit a 2-core machine's 2 CPUs), so
    # the deploy, which waits for both replicas, goes through on any machine.
    served = distilray("serve", "--checkpoint", str(tiny_checkpoint), "--detach", "--port",
                       str(port), "--set", "serve.min_replicas=2", "--set", "serve.max_length=64",
                       env=env)
    state = json.loads((state_dir / "cluster.json").read_text()) if (
        state_dir / "cluster.json").exists() else None
    try:
        assert served.returncode == 0, served.stderr[-3000:]
        assert state is not None, "--detach recorded no Ray head"
        need = full_scale_cpus(load_config(None, ["serve.min_replicas=2"]).serve)
        assert need == 3.2  # (2 + 1 surge) Classifiers x 1 CPU + (1 + 1) Ingress x 0.1
        assert state["nodes"][0]["num_cpus"] == max(os.cpu_count(), 4), state["nodes"]
        url = f"http://127.0.0.1:{port}"
        assert f"serving at {url}" in served.stdout
        # the head outlived the command that started it
        r = requests.post(f"{url}/v1/classify", json={"text": "a fresh machine"}, timeout=30)
        assert r.status_code == 200 and r.json()["checkpoint"].startswith("fresh@step1:")

        stopped = distilray("serve", "--stop", env=env, timeout=180)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert "stopped distilray" in stopped.stdout
        assert "stopped the Ray head" in stopped.stdout
        for node in state["nodes"]:  # `ray start --block` leads its own session
            wait_until(lambda sid=node["pid"]: not session_members(sid), 30,
                       f"the processes of node {node['name']} (session {node['pid']}) to exit")
        assert not (state_dir / "cluster.json").exists()
        assert not Path(state["temp_dir"]).exists()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "something still listens on the port"
    finally:
        for node in (state or {}).get("nodes", []):
            kill_session(node["pid"])


def train_tiny(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    """The README's smoke-test training, two steps on a small corpus."""
    out = distilray("train", "--config", "configs/tiny.yaml", "--set", "train.max_steps=2",
                    "--set", "data.synthetic_size=64", "--storage-path", str(tmp_path / "runs"),
                    "--name", name, env=fresh_env(tmp_path))
    assert out.returncode == 0, f"{name}: {out.stderr[-3000:]}"
    assert "Connecting to existing Ray cluster" not in out.stderr, f"{name} attached to a cluster"
    return out


def start_ray_head(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` in its own session, free ports, Ray's default temp dir."""
    ray_bin = Path(sys.executable).with_name("ray")
    gcs = free_port()
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-port", str(free_port()),
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "false",
           "--num-cpus", "1", "--disable-usage-stats"]
    log = open(tmp_path / "ray-head.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=fresh_env(tmp_path), start_new_session=True)
    return proc, gcs


@pytest.fixture
def ray_record():
    """Ray's record of "the" local cluster, as it was before the test (restored after)."""
    before = RAY_RECORD.read_bytes() if RAY_RECORD.exists() else None
    yield RAY_RECORD
    if before is None:
        RAY_RECORD.unlink(missing_ok=True)
    else:
        RAY_RECORD.write_bytes(before)


def test_train_without_ray_address_beside_a_ray_start_cluster_and_its_stale_record(
        tmp_path, ray_record):
    # (with no cluster at all: test_quickstart's training, also without RAY_ADDRESS)
    proc, gcs = start_ray_head(tmp_path)
    try:
        def head_recorded() -> bool:
            assert proc.poll() is None, (tmp_path / "ray-head.log").read_text()[-3000:]
            return ray_record.exists() and f":{gcs}" in ray_record.read_text()

        wait_until(head_recorded, 90, f"`ray start` to write {ray_record}")
        train_tiny(tmp_path, "beside-a-cluster")
    finally:
        kill_session(proc.pid)  # kill -9: the record it wrote stays behind, stale
        proc.wait(timeout=10)

    assert ray_record.exists() and f":{gcs}" in ray_record.read_text()
    train_tiny(tmp_path, "stale-record")
