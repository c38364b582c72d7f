"""Where distilray's stages meet Ray: joining or starting a cluster, Serve's node env, Ray Data.

Which cluster a command uses is decided here, once, for every stage:
- `RAY_ADDRESS` set (a `distilray cluster up` env.sh, `ray job submit`, a KubeRay pod): join it;
- this process already joined one: keep it;
- otherwise start a private local Ray instance for this command (`ray.init(address="local")`),
  even when a `ray start` cluster runs on the machine or a crashed one left its address
  record behind: a local command never attaches to a cluster it was not pointed at.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

DATA_CPUS = 1
"""CPUs left free for Ray Data's tokenising tasks; without one the trainer waits forever."""

# Ray Serve's high-throughput mode (Ray >= 2.55): HAProxy, a C load balancer, is the HTTP
# proxy and sends requests straight to the ingress replicas' own HTTP servers, and
# deployments call each other over gRPC. Every Ray process reads these when it starts, so
# they belong on the nodes (`ray start`, the pods' env), not in an application's config.
SERVE_HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# A replica that stops stays reachable this long before refusing connections, so that load
# balancers can deregister it (Ray's default: 30 s). On a local Ray instance HAProxy runs on
# the same machine and retries refused connections on another replica, so 2 s is enough, and
# deleting an app (quickstart's shutdown, `distilray serve --stop`) takes seconds, not 30.
LOCAL_SERVE_DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


# Ray Train's controller polls its workers every 2 s (Ray's default), so it notices a finished
# run up to 2 s late, and every run of a search or a pipeline waits that out. At 0.5 s a
# 5-step `tiny` run took 14.2 s instead of 16.1 s. A poll counts as missed only after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 minutes), so a busy worker is not failed sooner.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def use_fast_train_polling() -> None:
    """Before a TorchTrainer starts: Ray Train hands these from the driver's environment to its
    controller. A value the user set (e.g. on a `ray job submit`) is kept."""
    for key, value in TRAIN_POLL_ENV.items():
        os.environ.setdefault(key, value)


def with_serve_high_throughput(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus Serve's high-throughput mode for a local Ray instance, unless `environ`
    sets those variables itself (`RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0`
    keeps Ray's Python proxy)."""
    return {**SERVE_HIGH_THROUGHPUT_ENV, **LOCAL_SERVE_DRAIN_ENV, **environ}


def use_serve_high_throughput() -> None:
    """Before this process starts a local Ray instance: its nodes inherit os.environ."""
    os.environ.update(with_serve_high_throughput(os.environ))


def local_cpus(min_cpus: float) -> int:
    """Logical CPUs of the private local Ray `connect_ray` starts for a job of min_cpus (+2 for Ray Data)."""
    return max(os.cpu_count() or 1, int(min_cpus + 0.999) + 2)


def connect_ray(start_local: bool = True, min_cpus: float | None = None,
                include_dashboard: bool = True, log_to_driver: bool = True) -> bool:
    """Join RAY_ADDRESS's cluster (or the one this process joined), else start a private one.

    The one place distilray starts a local Ray instance, so every instance gets Serve's
    high-throughput mode (`distilray quickstart` serves from the instance `train` started).
    `min_cpus` sizes it for a job (+2 CPUs for Ray Data tasks); None leaves Ray's default.
    Returns False only when there is no RAY_ADDRESS and `start_local` is False.
    """
    import ray

    if ray.is_initialized():
        return True
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return True
    if not start_local:
        return False
    use_serve_high_throughput()
    cpus = None if min_cpus is None else local_cpus(min_cpus)
    init_local_ray(cpus, include_dashboard=include_dashboard, log_to_driver=log_to_driver)
    return True


def init_local_ray(num_cpus: int | None = None, include_dashboard: bool = True,
                   log_to_driver: bool = True) -> None:
    """`ray.init(address="local")` whose own processes ask this instance's State API.

    "local": a new instance even when `ray start` runs here or left a stale address record.
    Ray Train's PlacementGroupCleaner asks the State API whether a run's controller lives;
    with no address it looks for "the" cluster on the host, and beside another Ray instance
    it asks the wrong one, so every run's shutdown waits out its 12 s timeout (measured:
    a 2-step `tiny` run took 26 s instead of 16 s). The nodes inherit os.environ when they
    start, so RAY_API_SERVER_ADDRESS (this instance's dashboard, on a port picked here) is set
    for the start only: this process and the commands it runs keep their own environment.
    """
    import socket

    import ray

    if not include_dashboard or "RAY_API_SERVER_ADDRESS" in os.environ:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 log_to_driver=log_to_driver)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=port,
                 log_to_driver=log_to_driver)
    finally:
        del os.environ["RAY_API_SERVER_ADDRESS"]


def quiet_ray_data() -> None:
    """Our own progress lines (loss, samples/s, ETA) replace Ray Data's per-dataset bars."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
