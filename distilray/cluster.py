"""`distilray cluster up|down|status|submit`: a real multi-node Ray cluster on one machine.

`up` starts a head and N worker nodes, each its own `ray start --block` process in its own
session, with distinct logical resources (`distilray_head`, `distilray_worker`,
`distilray_worker_<i>`) so jobs can be pinned or forced to spread. Every port Ray would
otherwise take at a fixed default (GCS 6379, dashboard 8265, client 10001, agent 52365) is a
free one, and the Ray temp dir is private, so the cluster coexists with other local Ray
instances and `ray.init()` elsewhere never attaches to it by accident. `down` stops exactly
the processes `up` started (by process id and session), never with `ray stop`, which would
kill every Ray process on the machine.

Token authentication follows Ray's defaults for a new local cluster: on unless
`RAY_AUTH_MODE=disabled`; the token comes from `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
`~/.ray/auth_token` (generated with `ray get-auth-token --generate` if none exists). Clients
need `RAY_AUTH_MODE=token` and the same token; `up` writes `<dir>/env.sh` with both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distilray.errors import ClusterError, ConfigError
from distilray.runtime import with_serve_high_throughput

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
STARTUP_ATTEMPTS = 3
ENV_FILE = "env.sh"
HEAD_RESOURCE = "distilray_head"
WORKER_RESOURCE = "distilray_worker"
# Keys of a job spec file: the body of Ray's job REST API (`POST /api/jobs/`) / the keyword
# arguments of `JobSubmissionClient.submit_job`.
JOB_SPEC_KEYS = ("entrypoint", "runtime_env", "metadata", "submission_id", "entrypoint_num_cpus",
                 "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources")


def default_state_dir() -> Path:
    return Path(os.environ.get("DISTILRAY_CLUSTER_DIR", "~/.distilray/cluster")).expanduser()


# --------------------------------------------------------------------------- planning (pure)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    num_cpus: float
    num_gpus: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    object_store_mb: int | None = None


def plan_nodes(workers: int, head_cpus: float, worker_cpus: float, worker_gpus: int = 0,
               object_store_mb: int | None = None) -> list[NodeSpec]:
    """The head and `workers` worker nodes, each with a resource no other node has."""
    if workers < 1:
        raise ClusterError(f"--workers={workers}: a multi-node cluster needs at least 1 worker node")
    if head_cpus < 0 or worker_cpus <= 0:
        raise ClusterError(f"--head-cpus={head_cpus} / --worker-cpus={worker_cpus}: CPU counts must "
                           "be >= 0 for the head and > 0 for workers")
    if object_store_mb is not None and object_store_mb < 80:
        raise ClusterError(f"--object-store-mb={object_store_mb}: Ray needs at least 80 MB per node")
    nodes = [NodeSpec("head", head_cpus, 0, {HEAD_RESOURCE: 1.0}, object_store_mb)]
    for i in range(1, workers + 1):
        nodes.append(NodeSpec(f"worker-{i}", worker_cpus, worker_gpus,
                              {WORKER_RESOURCE: 1.0, f"{WORKER_RESOURCE}_{i}": 1.0}, object_store_mb))
    return nodes


def fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def ray_start_command(node: NodeSpec, *, gcs_port: int, agent_port: int, temp_dir: str,
                      head: bool, dashboard_port: int | None = None,
                      client_port: int | None = None, ray_bin: str = "ray") -> list[str]:
    """The `ray start --block` argv for one node; every fixed-default port is given explicitly."""
    cmd = [ray_bin, "start", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", fmt_num(node.num_cpus), "--num-gpus", str(node.num_gpus),
           "--resources", json.dumps(node.resources, sort_keys=True),
           "--dashboard-agent-listen-port", str(agent_port),
           # 0/0: workers bind OS-chosen ports, so nodes on one host never collide.
           "--min-worker-port", "0", "--max-worker-port", "0",
           "--disable-usage-stats"]
    if node.object_store_mb is not None:
        cmd += ["--object-store-memory", str(node.object_store_mb * 1024 * 1024)]
    if head:
        assert dashboard_port is not None and client_port is not None
        cmd += ["--head", "--port", str(gcs_port), "--temp-dir", temp_dir,
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port)]
    else:
        cmd += ["--address", f"127.0.0.1:{gcs_port}"]
    return cmd


# --------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class AuthSettings:
    mode: str
    """`token` or `disabled`."""
    token_path: str | None
    """File holding the token (None when it comes from RAY_AUTH_TOKEN or auth is off)."""
    token_from_env: bool = False


def resolve_auth(environ: Mapping[str, str], home: Path) -> AuthSettings:
    """Ray's rule for a new local cluster: token auth unless RAY_AUTH_MODE=disabled."""
    mode = environ.get("RAY_AUTH_MODE", "token").strip().lower() or "token"
    if mode not in ("token", "disabled"):
        raise ClusterError(f"RAY_AUTH_MODE={environ['RAY_AUTH_MODE']!r} is not a Ray auth mode; "
                           "use token (default) or disabled")
    if mode == "disabled":
        return AuthSettings("disabled", None)
    if environ.get("RAY_AUTH_TOKEN"):
        return AuthSettings("token", None, token_from_env=True)
    path = environ.get("RAY_AUTH_TOKEN_PATH") or str(home / ".ray" / "auth_token")
    return AuthSettings("token", str(Path(path).expanduser()))


def read_token(auth: AuthSettings, environ: Mapping[str, str]) -> str | None:
    if auth.mode != "token":
        return None
    if auth.token_from_env:
        return environ["RAY_AUTH_TOKEN"].strip()
    assert auth.token_path is not None
    try:
        token = Path(auth.token_path).read_text().strip()
    except OSError:
        return None
    return token or None


def _ensure_token(auth: AuthSettings, env: Mapping[str, str]) -> str | None:
    """Return the cluster token, generating ~/.ray/auth_token the way `ray.init()` would."""
    token = read_token(auth, env)
    if auth.mode != "token" or token:
        return token
    if env.get("RAY_AUTH_TOKEN_PATH"):
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']} does not hold a token; "
                           "write one there (e.g. `openssl rand -hex 32 > $RAY_AUTH_TOKEN_PATH`) or "
                           "unset it to use ~/.ray/auth_token")
    subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=dict(env), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    token = read_token(auth, env)
    if not token:
        raise ClusterError(f"`ray get-auth-token --generate` wrote no token to {auth.token_path}")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def client_env_lines(state: ClusterState) -> list[str]:
    """`export` lines that point `ray job submit` and `ray.init()` at the cluster."""
    lines = [f"export RAY_ADDRESS={shlex.quote(state.dashboard_url)}",
             f"export RAY_AUTH_MODE={state.auth_mode}"]
    if state.auth_mode == "token" and state.token_path:
        lines.append(f"export RAY_AUTH_TOKEN_PATH={shlex.quote(state.token_path)}")
    return lines


# --------------------------------------------------------------------------- state


@dataclass
class NodeProcess:
    name: str
    pid: int
    start_ticks: int
    """Process start time (/proc/<pid>/stat field 22): guards against a recycled pid."""
    log: str
    num_cpus: float
    num_gpus: int
    resources: dict[str, float]


@dataclass
class ClusterState:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    auth_mode: str
    token_path: str | None
    nodes: list[NodeProcess]

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(state_dir / STATE_FILE)
        (state_dir / ENV_FILE).write_text(
            "# source this file to submit jobs to the local distilray cluster\n"
            + "\n".join(client_env_lines(self)) + "\n")

    def client_env(self) -> dict[str, str]:
        """What a process sets before importing Ray to join this cluster through its GCS."""
        env = {"RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": self.auth_mode}
        if self.auth_mode == "token" and self.token_path:
            env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        return env

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        try:
            raw = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{state_dir / STATE_FILE} is unreadable ({exc}); remove it and "
                               "stop leftover processes by pid (see its node logs)") from None
        raw["nodes"] = [NodeProcess(**n) for n in raw["nodes"]]
        return cls(**raw)


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(session id, start ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    # After "pid (comm) ": state ppid pgrp session ... starttime is field 22 overall.
    return int(fields[3]), int(fields[19])


def _session_members(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[0] == sid:
                pids.append(int(entry.name))
    return pids


def node_alive(node: NodeProcess) -> bool:
    st = _proc_stat(node.pid)
    return st is not None and st[0] == node.pid and st[1] == node.start_ticks


# --------------------------------------------------------------------------- up / down


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def _http_json(url: str, token: str | None, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers=auth_headers(token))
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def list_nodes(dashboard_url: str, token: str | None) -> list[dict[str, Any]]:
    """Alive and dead nodes as the dashboard's state API reports them."""
    data = _http_json(f"{dashboard_url}/api/v0/nodes?limit=1000", token)
    return data["data"]["result"]["result"]


def _spawn(cmd: list[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Own session: `down` can find every process this node started (raylet, GCS, workers).
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), start_new_session=True)


def _record(name: str, proc: subprocess.Popen, log: Path, spec: NodeSpec) -> NodeProcess:
    st = _proc_stat(proc.pid)
    if st is None:
        raise ClusterError(f"node {name} exited at once; see {log}")
    return NodeProcess(name, proc.pid, st[1], str(log), spec.num_cpus, spec.num_gpus,
                       dict(spec.resources))


def _wait_for_nodes(state: ClusterState, token: str | None, want: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "dashboard not answering yet"
    while time.monotonic() < deadline:
        for node in state.nodes:
            if not node_alive(node):
                tail = _tail(Path(node.log))
                raise ClusterError(f"node {node.name} (pid {node.pid}) exited while starting; "
                                   f"last lines of {node.log}:\n{tail}")
        try:
            alive = [n for n in list_nodes(state.dashboard_url, token) if n["state"] == "ALIVE"]
            if len(alive) >= want:
                return
            last = f"{len(alive)}/{want} nodes alive"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ClusterError(f"the dashboard refused our token (HTTP {exc.code}); check "
                                   "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token") from None
            last = f"dashboard answered HTTP {exc.code}"
        except (OSError, ValueError, KeyError) as exc:
            last = f"dashboard not ready ({exc.__class__.__name__})"
        time.sleep(1.0)
    raise ClusterError(f"the cluster did not come up within {timeout_s:.0f} s ({last}); "
                       f"node logs: {', '.join(n.log for n in state.nodes)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cluster_up(state_dir: Path, nodes: Sequence[NodeSpec], *, timeout_s: float = 120.0,
               environ: Mapping[str, str] | None = None) -> ClusterState:
    """Start the head, then the workers; return once every node is ALIVE in the GCS."""
    env = with_serve_high_throughput(os.environ if environ is None else environ)
    existing = ClusterState.load(state_dir)
    if existing is not None and any(node_alive(n) for n in existing.nodes):
        raise ClusterError(f"a cluster from {state_dir} is already running at "
                           f"{existing.dashboard_url}; run `distilray cluster down` first or pass "
                           "another --dir")
    auth = resolve_auth(env, Path.home())
    token = _ensure_token(auth, env)
    env["RAY_AUTH_MODE"] = auth.mode
    # `down` SIGTERMs the nodes; Ray then drains each for up to 30 s by default.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    # Unix socket paths under the temp dir must stay below ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="drc-", dir="/tmp" if os.path.isdir("/tmp") else None)
    state = ClusterState(gcs_address="", dashboard_url="", temp_dir=temp_dir,
                         auth_mode=auth.mode, token_path=auth.token_path, nodes=[])
    logs = state_dir / "logs"
    ray = _ray_bin()

    def start(spec: NodeSpec, head: bool) -> None:
        """Start one node and wait until it is ALIVE; retry when Ray's startup timed out."""
        log = logs / f"{spec.name}.log"
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            if head:  # fresh ports on every try: a crashed head may leave them in TIME_WAIT
                gcs, dash = _free_port(), _free_port()
                state.gcs_address = f"127.0.0.1:{gcs}"
                state.dashboard_url = f"http://127.0.0.1:{dash}"
                cmd = ray_start_command(spec, gcs_port=gcs, agent_port=_free_port(),
                                        temp_dir=temp_dir, head=True, dashboard_port=dash,
                                        client_port=_free_port(), ray_bin=ray)
            else:
                cmd = ray_start_command(spec, gcs_port=int(state.gcs_address.rsplit(":", 1)[1]),
                                        agent_port=_free_port(), temp_dir=temp_dir, head=False,
                                        ray_bin=ray)
            # Processes on the nodes (e.g. Ray Train's placement-group cleaner, which queries
            # the State API) resolve "the cluster" from RAY_ADDRESS, else by scanning the
            # machine for GCS processes — which fails or picks another cluster when several
            # Ray instances run here. Point them at ours.
            node_env = {**env, "RAY_ADDRESS": state.gcs_address}
            node = _record(spec.name, _spawn(cmd, log, node_env), log, spec)
            state.nodes.append(node)
            state.save(state_dir)
            try:
                _wait_for_nodes(state, token, len(state.nodes), timeout_s)
                return
            except ClusterError as exc:
                # An overloaded machine can miss Ray's fixed 30 s raylet registration window.
                if attempt == STARTUP_ATTEMPTS or "timed out during startup" not in str(exc):
                    raise
                log_note = f"\n--- attempt {attempt} timed out; retrying ---\n"
                with open(log, "a") as fh:
                    fh.write(log_note)
                stop_nodes([node])
                state.nodes.remove(node)

    try:
        start(nodes[0], head=True)
        for spec in nodes[1:]:
            start(spec, head=False)
    except BaseException:
        stop_nodes(state.nodes)
        raise
    return state


def stop_nodes(nodes: Sequence[NodeProcess], timeout_s: float = 40.0) -> list[int]:
    """SIGTERM each node's `ray start` (workers first), then SIGKILL what is left of its session.

    Returns the pids that had to be killed. Only processes in sessions this module created are
    touched: the session id is the recorded `ray start` pid, checked against its start time.
    """
    killed: list[int] = []
    workers = [n for n in nodes if n.name != "head"]
    heads = [n for n in nodes if n.name == "head"]
    for group in (workers, heads):  # workers first, together; the head (GCS) last
        live = [n for n in group if node_alive(n)]
        for node in group:
            if node not in live and _proc_stat(node.pid) is None:
                # The leader is gone: only orphans of our session can remain.
                killed += _kill_session(node.pid)
        for node in live:
            # `ray start --block` drains the node and stops its processes on SIGTERM.
            _signal(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_session_members(n.pid) for n in live):
            time.sleep(0.25)
        for node in live:
            killed += _kill_session(node.pid)
    return killed


def _kill_session(sid: int, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every live member of session `sid` until none is left (or timeout)."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while (members := _session_members(sid)) and time.monotonic() < deadline:
        for pid in members:
            if pid not in killed:
                _signal(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    return killed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cluster_down(state_dir: Path, *, purge: bool = False) -> ClusterState | None:
    state = ClusterState.load(state_dir)
    if state is None:
        return None
    stop_nodes(state.nodes)
    if purge:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    else:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        (state_dir / ENV_FILE).unlink(missing_ok=True)
    return state


def lose_node(state_dir: Path, name: str) -> list[int]:
    """SIGKILL every process of one recorded node at once, as a spot reclaim or a lost host would:
    no drain, no goodbye to the GCS. Returns the killed pids (for fault tests and drills)."""
    state = ClusterState.load(state_dir)
    node = next((n for n in state.nodes if n.name == name), None) if state else None
    if node is None:
        raise ClusterError(f"no node named {name!r} recorded in {state_dir}")
    if node.name == "head":
        raise ClusterError("losing the head ends the cluster; lose a worker node")
    return _kill_session(node.pid) if node_alive(node) else []


def rejoin_node(state_dir: Path, name: str, *, timeout_s: float = 120.0,
                environ: Mapping[str, str] | None = None) -> NodeProcess:
    """Start a recorded worker node again (same resources) after it was lost; returns once the
    GCS counts it ALIVE. The node joins as a new Ray node (a new node id)."""
    state = ClusterState.load(state_dir)
    old = next((n for n in state.nodes if n.name == name), None) if state else None
    if state is None or old is None or old.name == "head":
        raise ClusterError(f"no worker node named {name!r} recorded in {state_dir}")
    if node_alive(old):
        raise ClusterError(f"node {name} (pid {old.pid}) is still running")
    env = with_serve_high_throughput(os.environ if environ is None else environ)
    env.update({"RAY_AUTH_MODE": state.auth_mode, "RAY_ADDRESS": state.gcs_address})
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")
    if state.token_path:
        env.setdefault("RAY_AUTH_TOKEN_PATH", state.token_path)
    spec = NodeSpec(old.name, old.num_cpus, old.num_gpus, dict(old.resources))
    cmd = ray_start_command(spec, gcs_port=int(state.gcs_address.rsplit(":", 1)[1]),
                            agent_port=_free_port(), temp_dir=state.temp_dir, head=False,
                            ray_bin=_ray_bin())
    token = read_token(resolve_auth(env, Path.home()), env) if state.auth_mode == "token" else None
    label = max(old.resources, key=len)  # distilray_worker_<i>: this node's own resource

    def alive_ids() -> set[str]:
        return {n["node_id"] for n in list_nodes(state.dashboard_url, token)
                if n["state"] == "ALIVE" and label in n.get("resources_total", {})}

    before = alive_ids()  # the lost node may still count as ALIVE until its heartbeats time out
    log_path = Path(old.log)
    with open(log_path, "a") as fh:
        fh.write("\n--- rejoin ---\n")
    node = _record(name, _spawn(cmd, log_path, env), log_path, spec)
    state.nodes[state.nodes.index(old)] = node
    state.save(state_dir)
    deadline = time.monotonic() + timeout_s
    while not alive_ids() - before:
        if not node_alive(node) or time.monotonic() > deadline:
            raise ClusterError(f"node {name} did not rejoin within {timeout_s:.0f} s; last lines "
                               f"of {log_path}:\n{_tail(log_path)}")
        time.sleep(1.0)
    return node


def cluster_status(state_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    state = ClusterState.load(state_dir)
    if state is None:
        raise ClusterError(f"no cluster recorded in {state_dir}; start one with `distilray cluster up`")
    token = None
    if state.auth_mode == "token":
        token = read_token(resolve_auth({**env, "RAY_AUTH_MODE": "token"}, Path.home()), env)
    procs = {n.name: node_alive(n) for n in state.nodes}
    try:
        nodes = list_nodes(state.dashboard_url, token)
    except (OSError, ValueError, KeyError) as exc:
        nodes, error = [], f"{exc.__class__.__name__}: {exc}"
    else:
        error = None
    return {"dashboard_url": state.dashboard_url, "gcs_address": state.gcs_address,
            "auth_mode": state.auth_mode, "processes": procs, "nodes": nodes, "error": error}


# --------------------------------------------------------------------------- job specs


def load_job_spec(path: str | Path) -> dict[str, Any]:
    """Read a job spec (YAML/JSON with the keys of Ray's job REST API) and check its shape."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read job spec {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a job spec is a mapping with keys {', '.join(JOB_SPEC_KEYS)}")
    problems = [f"{path}: unknown key '{k}' (allowed: {', '.join(JOB_SPEC_KEYS)})"
                for k in spec if k not in JOB_SPEC_KEYS]
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{path}: 'entrypoint' must be a non-empty command string")
    if "runtime_env" in spec and not isinstance(spec["runtime_env"], dict):
        problems.append(f"{path}: 'runtime_env' must be a mapping")
    if problems:
        raise ConfigError(problems)
    return spec


def submit_job_spec(spec: Mapping[str, Any], address: str, token: str | None) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=auth_headers(token) or None)
    return client.submit_job(**{k: v for k, v in spec.items() if v is not None})


def submit_to_cluster(spec: Mapping[str, Any], state_dir: Path) -> dict[str, str]:
    """Submit a checked job spec to RAY_ADDRESS's cluster, else to the one recorded in state_dir."""
    state = ClusterState.load(state_dir)
    address = os.environ.get("RAY_ADDRESS") or (state.dashboard_url if state else None)
    if not address:
        raise ClusterError("no cluster to submit to: set RAY_ADDRESS=http://<head>:8265 or run "
                           "`distilray cluster up`")
    env = dict(os.environ)
    auth = resolve_auth(env, Path.home())
    if state is not None and state.token_path and "RAY_AUTH_TOKEN_PATH" not in env:
        auth = AuthSettings("token", state.token_path)
    submission_id = submit_job_spec(spec, address, read_token(auth, env))
    return {"submission_id": submission_id, "address": address, "auth_mode": auth.mode}


# --------------------------------------------------------------------------- the serve head


def serve_head_dir() -> Path:
    """Where `distilray serve --detach` records the Ray head it starts when RAY_ADDRESS is unset."""
    return Path(os.environ.get("DISTILRAY_SERVE_DIR", "~/.distilray/serve")).expanduser()


def local_head_node(min_cpus: float = 0.0) -> NodeSpec:
    """A head with the machine's resources, as `ray start --head` would take: every CPU and GPU;
    at least `min_cpus` logical CPUs (what the application to deploy holds at full scale)."""
    gpus = 0
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False,
                             timeout=30)
        if out.returncode == 0:  # one "GPU <i>: <name> (UUID: ...)" line per device
            gpus = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
    return NodeSpec("head", max(float(os.cpu_count() or 1), float(math.ceil(min_cpus))), gpus)


def serve_head(state_dir: Path, start: bool, min_cpus: float = 0.0) -> ClusterState | None:
    """The persistent head `serve --detach` deploys on: the recorded one while it lives; after a
    dead one, what is left of its session is stopped; a new one when `start`. None if none runs.

    It is a node like `cluster up`'s: `ray start --block` in its own session, free ports, a
    private temp dir, token auth, so it outlives the command and `--stop` stops exactly it.
    """
    state = ClusterState.load(state_dir)
    if state is not None and not all(node_alive(n) for n in state.nodes):
        cluster_down(state_dir, purge=True)
        state = None
    if state is None and start:
        log.info("RAY_ADDRESS is unset: starting a Ray head for `distilray serve --detach` "
                 "(recorded in %s; `distilray serve --stop` stops it)", state_dir)
        state = cluster_up(state_dir, [local_head_node(min_cpus)])
    return state
