"""`distilray cluster` without starting Ray: node plans, `ray start` argv, auth rules, job specs,
runtime envs, the cloud launcher example, and stopping exactly the processes we started."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from distilray.cli import check_entrypoint
from distilray.cluster import (
    HEAD_RESOURCE,
    JOB_SPEC_KEYS,
    WORKER_RESOURCE,
    AuthSettings,
    ClusterState,
    NodeProcess,
    load_job_spec,
    node_alive,
    plan_nodes,
    ray_start_command,
    read_token,
    resolve_auth,
    stop_nodes,
    with_serve_high_throughput,
)
from distilray.errors import ClusterError, ConfigError
from distilray.runtime import use_fast_train_polling
from tests.conftest import REPO

JOB_SPECS = sorted((REPO / "cluster" / "jobs").glob("*.yaml"))
RUNTIME_ENVS = sorted((REPO / "cluster").glob("runtime_env*.yaml"))
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes",
                    "container", "image_uri", "config", "py_executable", "java_jars", "nsight"}


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --------------------------------------------------------------------------- planning


def test_plan_gives_every_node_a_resource_no_other_node_has():
    nodes = plan_nodes(workers=2, head_cpus=3, worker_cpus=2, object_store_mb=300)
    assert [n.name for n in nodes] == ["head", "worker-1", "worker-2"]
    assert nodes[0].resources == {HEAD_RESOURCE: 1.0}
    assert nodes[2].resources == {WORKER_RESOURCE: 1.0, f"{WORKER_RESOURCE}_2": 1.0}
    unique = [set(n.resources) - set().union(*(m.resources for m in nodes if m is not n))
              for n in nodes]
    assert all(unique)
    assert [n.num_cpus for n in nodes] == [3, 2, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0, "head_cpus": 2, "worker_cpus": 2}, "at least 1 worker"),
    ({"workers": 1, "head_cpus": 2, "worker_cpus": 0}, "CPU counts"),
    ({"workers": 1, "head_cpus": 2, "worker_cpus": 2, "object_store_mb": 10}, "80 MB"),
])
def test_plan_refuses_clusters_that_cannot_work(kwargs, match):
    with pytest.raises(ClusterError, match=match):
        plan_nodes(**kwargs)


def test_ray_start_commands_pin_every_fixed_default_port():
    head, worker = plan_nodes(1, 3, 2, worker_gpus=1, object_store_mb=200)
    h = ray_start_command(head, gcs_port=41000, agent_port=41001, temp_dir="/tmp/drc-x",
                          head=True, dashboard_port=41002, client_port=41003)
    w = ray_start_command(worker, gcs_port=41000, agent_port=41004, temp_dir="/tmp/drc-x",
                          head=False)
    assert h[:3] == ["ray", "start", "--block"] and "--head" in h and "--head" not in w
    assert _flag(h, "--port") == "41000" and _flag(w, "--address") == "127.0.0.1:41000"
    assert _flag(h, "--dashboard-host") == "127.0.0.1"  # the dashboard stays on loopback
    assert (_flag(h, "--dashboard-port"), _flag(h, "--ray-client-server-port")) == ("41002", "41003")
    assert _flag(h, "--dashboard-agent-listen-port") != _flag(w, "--dashboard-agent-listen-port")
    assert _flag(h, "--temp-dir") == "/tmp/drc-x" and "--temp-dir" not in w  # head-only flag
    assert _flag(w, "--min-worker-port") == _flag(w, "--max-worker-port") == "0"
    assert json.loads(_flag(h, "--resources")) == {HEAD_RESOURCE: 1.0}
    assert (_flag(h, "--num-cpus"), _flag(w, "--num-cpus"), _flag(w, "--num-gpus")) == ("3", "2", "1")
    assert _flag(w, "--object-store-memory") == str(200 * 1024 * 1024)
    # `ray start` accepts every flag we pass (catches a renamed or removed option)
    help_text = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    for flag in {a for a in h + w if a.startswith("--")}:
        assert flag in help_text, flag


# --------------------------------------------------------------------------- auth


def test_nodes_get_serve_high_throughput_mode_unless_the_user_set_it():
    env = with_serve_high_throughput({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    opted_out = with_serve_high_throughput({"RAY_SERVE_ENABLE_HA_PROXY": "0"})
    assert opted_out["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert opted_out["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_train_runs_poll_their_workers_every_half_second_unless_the_user_set_it(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    use_fast_train_polling()
    # Ray Train hands the driver's value to its controller (the one that polls)
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    use_fast_train_polling()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_auth_follows_rays_defaults_for_a_new_local_cluster(tmp_path):
    assert resolve_auth({}, tmp_path) == AuthSettings("token", str(tmp_path / ".ray" / "auth_token"))
    assert resolve_auth({"RAY_AUTH_MODE": "disabled"}, tmp_path).mode == "disabled"
    assert resolve_auth({"RAY_AUTH_TOKEN": "abc"}, tmp_path) == AuthSettings("token", None, True)
    custom = tmp_path / "tok"
    assert resolve_auth({"RAY_AUTH_TOKEN_PATH": str(custom)}, tmp_path).token_path == str(custom)
    with pytest.raises(ClusterError, match="RAY_AUTH_MODE='tokn'"):
        resolve_auth({"RAY_AUTH_MODE": "tokn"}, tmp_path)


def test_token_is_read_from_env_or_file(tmp_path):
    path = tmp_path / "tok"
    auth = AuthSettings("token", str(path))
    assert read_token(auth, {}) is None
    path.write_text("s3cret\n")
    assert read_token(auth, {}) == "s3cret"
    assert read_token(AuthSettings("token", None, True), {"RAY_AUTH_TOKEN": " t "}) == "t"
    assert read_token(AuthSettings("disabled", None), {"RAY_AUTH_TOKEN": "t"}) is None


def test_state_round_trips_and_env_file_points_clients_at_the_cluster(tmp_path):
    node = NodeProcess("head", 123, 456, "/x/head.log", 2.0, 0, {HEAD_RESOURCE: 1.0})
    state = ClusterState("127.0.0.1:6000", "http://127.0.0.1:8300", "/tmp/drc-a", "token",
                         "/home/u/.ray/auth_token", [node])
    state.save(tmp_path)
    assert ClusterState.load(tmp_path) == state
    env = (tmp_path / "env.sh").read_text()
    assert "export RAY_ADDRESS=http://127.0.0.1:8300\n" in env
    assert "export RAY_AUTH_MODE=token\n" in env
    assert "export RAY_AUTH_TOKEN_PATH=/home/u/.ray/auth_token\n" in env
    out = subprocess.run(["bash", "-c", f"source {tmp_path}/env.sh && echo $RAY_ADDRESS $RAY_AUTH_MODE"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["http://127.0.0.1:8300", "token"]
    assert ClusterState.load(tmp_path / "none") is None


# --------------------------------------------------------------------------- stopping


def _spawn_tree() -> subprocess.Popen:
    """A session leader with a child and a grandchild, like `ray start --block` and its raylet."""
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & (sleep 300 &); wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(_session(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def _session(sid: int) -> list[int]:
    from distilray.cluster import _session_members

    return _session_members(sid)


def test_stop_nodes_ends_exactly_the_sessions_it_started():
    from distilray.cluster import _proc_stat

    ours, bystander = _spawn_tree(), _spawn_tree()
    try:
        assert len(_session(ours.pid)) == len(_session(bystander.pid)) == 3
        node = NodeProcess("worker-1", ours.pid, _proc_stat(ours.pid)[1], "-", 1, 0, {})
        assert node_alive(node)
        stale = NodeProcess("worker-2", bystander.pid, _proc_stat(bystander.pid)[1] + 1, "-", 1, 0, {})
        assert not node_alive(stale)  # same pid, other start time: a recycled pid is not ours
        killed = stop_nodes([node], timeout_s=1.0)
        ours.wait(timeout=10)
        assert _session(ours.pid) == []
        assert len(killed) >= 2  # the leader exits on SIGTERM; its background sleeps need SIGKILL
        assert bystander.poll() is None and len(_session(bystander.pid)) == 3
    finally:
        for proc in (ours, bystander):
            for pid in _session(proc.pid):
                os.kill(pid, 9)
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- job specs and envs


@pytest.mark.parametrize("spec_path", JOB_SPECS, ids=lambda p: p.name)
def test_job_specs_are_valid_and_their_entrypoints_parse(spec_path):
    spec = load_job_spec(spec_path)
    assert set(spec) <= set(JOB_SPEC_KEYS)
    assert spec_path.read_text().startswith("#"), "each spec opens with its purpose and command"
    args = check_entrypoint(spec["entrypoint"], cwd=REPO)
    assert args.command in ("train", "tune", "serve")
    env = spec.get("runtime_env", {})
    assert set(env) <= RUNTIME_ENV_KEYS and ".venv" in env.get("excludes", [])
    # The same spec through Ray's own submission client model: every key is accepted.
    from ray.dashboard.modules.job.common import JobSubmitRequest

    JobSubmitRequest(**spec)


def test_train_tiny_spec_forces_two_nodes():
    """2 workers × 2 CPUs cannot share one of `cluster up`'s default nodes, and each node
    keeps a CPU for the Ray Data tasks feeding its worker (without one the job hangs)."""
    args = check_entrypoint(load_job_spec(REPO / "cluster/jobs/train-tiny.yaml")["entrypoint"],
                            cwd=REPO)
    cpus = float(next(o.split("=")[1] for o in args.overrides if o.startswith("train.cpus_per_worker")))
    parser_defaults = {a.dest: a.default for a in _cluster_parser()._actions}
    for node_cpus in (parser_defaults["head_cpus"], parser_defaults["worker_cpus"]):
        assert args.workers * cpus > node_cpus  # the two workers cannot share a node
        assert cpus + 1 <= node_cpus  # a worker plus one CPU for Ray Data fits on each


def _cluster_parser():
    from distilray.cli import build_parser

    return build_parser()._subparsers._group_actions[0].choices["cluster"]  # type: ignore[union-attr]


@pytest.mark.parametrize("text, match", [
    ("entrypoint: python train.py\n", "not a distilray command"),
    ("entrypoint: distilray train --wokers 2\n", "does not parse"),
    ("entrypoint: distilray train --config configs/missing.yaml\n", "cannot read config file"),
    ("entrypoint: distilray train --config configs/tiny.yaml --set train.lr=-1\n", "out of range"),
    ("entrypoint: distilray train\nruntime_env: [1]\n", "'runtime_env' must be a mapping"),
    ("entrypoint: distilray train\nentry_point: x\n", "unknown key 'entry_point'"),
    ("- just a list\n", "a job spec is a mapping"),
])
def test_job_spec_checks_refuse_what_cannot_run(tmp_path, text, match):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        check_entrypoint(load_job_spec(path)["entrypoint"], cwd=REPO)


def test_cluster_submit_refuses_a_bad_spec_before_contacting_any_cluster(tmp_path, capsys):
    from distilray.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text("entrypoint: distilray train --config configs/tiny.yaml --set train.nope=1\n")
    rc = main(["cluster", "submit", str(path), "--dir", str(tmp_path / "state")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("distilray cluster: error: unknown key 'train.nope'")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("env_path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_envs_use_only_ray_keys(env_path):
    env = yaml.safe_load(env_path.read_text())
    assert set(env) <= RUNTIME_ENV_KEYS
    assert {".git", ".venv"} <= set(env["excludes"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{k: v for k, v in env.items() if k != "working_dir"})  # Ray's own validation


def test_status_and_down_without_a_cluster_say_so(tmp_path, capsys):
    from distilray.cli import main

    assert main(["cluster", "status", "--dir", str(tmp_path)]) == 2
    assert "no cluster recorded" in capsys.readouterr().err
    assert main(["cluster", "down", "--dir", str(tmp_path)]) == 0
    assert "no cluster recorded" in capsys.readouterr().out


# --------------------------------------------------------------------------- cloud launcher


def test_cloud_launcher_example_is_a_valid_autoscaling_gpu_cluster():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    schema_path = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = types["gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 0 == gpu["min_workers"] < gpu["max_workers"] <= config["max_workers"]
    assert types["head"]["resources"] == {"CPU": 0}
    # token auth: the token is shipped to every node and enforced by `ray start`
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert cmd.startswith("ulimit -n 65536; RAY_AUTH_MODE=token RAY_SERVE_ENABLE_HA_PROXY=1 "
                              "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start"), cmd
    # the submit command in its header parses with the CLI
    header = "".join(line[1:] for line in (REPO / "cluster/aws-gpu.yaml").read_text().splitlines()
                     if line.startswith("#"))
    submit = header[header.index("distilray train"):header.index("ray down")].replace("\\", " ")
    args = check_entrypoint(" ".join(shlex.split(submit)), cwd=REPO)
    assert args.gpu and args.storage_path.startswith("s3://")


def test_connect_ray_without_a_cluster_does_not_start_one_unless_asked():
    """`distilray serve --stop` must not start a Ray instance just to find nothing to stop.

    In a fresh interpreter: the suite's own Ray instance may be up in this one."""
    code = ("import ray\nfrom distilray.runtime import connect_ray\n"
            "print(connect_ray(start_local=False), ray.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
