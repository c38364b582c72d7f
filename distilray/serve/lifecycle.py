"""Starting, waiting for and stopping a distilray Serve application on the Ray cluster
this process joins (`runtime.connect_ray`). The CLI and the quickstart call these."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

from ray import serve

from distilray.checkpoints import check_servable
from distilray.config import Config, ServeConfig
from distilray.errors import DistilrayError
from distilray.runtime import connect_ray
from distilray.serve.app import bind_app, full_scale_cpus, http_options, surge_resources
from distilray.serve.http import server_token

log = logging.getLogger(__name__)


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{host}:{cfg.port}{prefix}"


def wait_ready(url: str, timeout_s: float = 120.0, token: str | None = None) -> dict[str, Any]:
    """Poll `<url>/readyz` until it answers 200; return its body."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise DistilrayError(f"{url}/readyz did not answer 200 within {timeout_s:.0f}s (last: {last}); "
                         "see the replica logs in logs/serve/ of the Ray session directory "
                         "(ray.get_runtime_context() names it; /tmp/ray/session_latest for Ray's default)")


def start_server(cfg: Config, checkpoint: str | None, bundle: dict[str, str] | None = None) -> str:
    """Deploy `checkpoint` (or a model-store `bundle` from `app.pin_bundle`) with `cfg.serve`,
    wait until /readyz answers, return the base URL.

    Uses RAY_ADDRESS, the cluster this process is connected to, or a new local one
    (`runtime.connect_ray`); the application lives as long as that cluster, or until
    `shutdown_server`. An application of the same name already running is updated in place:
    Serve starts the new replicas, then drains the old ones.
    """
    s = cfg.serve
    path = None if bundle else check_servable(checkpoint or "")
    server_token(s.auth_token_env, s.auth_token_file)  # fail here, not in every replica
    # a private local instance (no RAY_ADDRESS, none joined) is sized so every replica fits
    connect_ray(min_cpus=full_scale_cpus(s), include_dashboard=False, log_to_driver=False)
    serve.start(http_options=http_options(s))
    actual = serve.context._get_global_client().http_config
    if (actual.host, actual.port) != (s.host, s.port):
        log.warning("Serve is already running on %s:%s (asked for %s:%s); using it",
                    actual.host, actual.port, s.host, s.port)
        s = replace(s, host=actual.host, port=actual.port)
    s = surge_that_fits(s)
    token = os.environ.get(s.auth_token_env)
    # replicas on an already running cluster do not see this shell's environment
    env = {s.auth_token_env: token} if token and not s.auth_token_file else None
    app = bind_app(str(path) if path else None, s, env, bundle=bundle)
    t0 = time.time()
    try:  # returns once the application is RUNNING (for an update: the rollout is done)
        serve.run(app, name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    except RuntimeError as exc:  # DEPLOY_FAILED: the replicas' own error says why
        raise DistilrayError(deploy_failure(s.app_name) or str(exc)) from None
    url = base_url(s)
    if bundle:
        wait_deployed(s.app_name)
    ready = wait_ready(url)
    log.info("serving %s at %s (ready in %.1fs)", ready.get("version") or ready.get("checkpoint"),
             url, time.time() - t0)
    return url


def surge_that_fits(s: ServeConfig) -> ServeConfig:
    """`s`, or `s` without a surge when the cluster has no room now for the extra replicas of
    a version change: Serve would leave them pending and the change would never finish.
    Without a surge Serve stops each old replica first, so the change goes through; a
    one-replica deployment answers nothing while its replacement loads (a warning says so)."""
    import ray

    if s.max_surge_percent <= 0:
        return s
    app = serve.status().applications.get(s.app_name)
    if app is None or not app.deployments:  # a first deploy: nothing to replace
        return s
    running = {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}
    need = surge_resources(s, running)
    free = ray.available_resources()
    short = [f"{need[k]:g} {k} (free: {free.get(k, 0.0):g})" for k in ("CPU", "GPU")
             if need[k] > 0 and free.get(k, 0.0) + 1e-9 < need[k]]
    if not short:
        return s
    log.warning("no room for the extra replicas of serve.max_surge_percent=%d (%s): the old "
                "replicas stop before their replacements start, so %s answers nothing while "
                "a one-replica deployment's replacement loads; add capacity to keep it "
                "answering", s.max_surge_percent, ", ".join(short), s.app_name)
    return replace(s, max_surge_percent=0)


def wait_deployed(app_name: str, timeout_s: float = 300.0) -> None:
    """Wait until Serve reports the application RUNNING (every replica of the new version
    started, the old ones drained); a failed deploy raises with Serve's message (e.g. a
    bundle that does not match its manifest)."""
    deadline = time.monotonic() + timeout_s
    status = None
    time.sleep(0.5)  # let the controller take the new config before reading its status
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DistilrayError(deploy_failure(app_name) or f"application {app_name}: {status.status}")
        time.sleep(0.5)
    raise DistilrayError(f"application {app_name} was not RUNNING within {timeout_s:.0f}s "
                         f"(status {status.status if status else 'missing'})")


def shutdown_server(cfg: Config) -> bool:
    """Delete the application; shut Serve down when nothing else is deployed. False if none ran."""
    if not connect_ray(start_local=False, include_dashboard=False, log_to_driver=False):
        return False
    try:
        apps = serve.status().applications
    except Exception:  # Serve not running on this cluster
        return False
    if cfg.serve.app_name not in apps:
        return False
    serve.delete(cfg.serve.app_name)
    if not set(apps) - {cfg.serve.app_name}:
        serve.shutdown()
    return True


def serve_applications() -> list[str]:
    """The Serve applications on the cluster this process joined (none when Serve is off)."""
    try:
        return sorted(serve.status().applications)
    except Exception:  # Serve not running on this cluster
        return []


def serve_until_interrupted(cfg: Config) -> None:
    """Block until Ctrl-C, then delete the application."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping %s", cfg.serve.app_name)
    shutdown_server(cfg)


def deploy_failure(app_name: str) -> str | None:
    """Why Serve could not deploy `app_name`: its deployments' messages (a replica's
    constructor error, e.g. a bundle that does not match its manifest), or None."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return None
    messages = [status.message] + [d.message for d in status.deployments.values()]
    text = " | ".join(m.strip() for m in messages if m and m.strip())
    return f"application {app_name} failed to deploy: {text[-3000:]}" if text else None
