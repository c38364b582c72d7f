"""Experiment tracking: MLflow runs and TensorBoard event files for train, tune, distill, evaluate.

Off unless `track.mlflow` or `MLFLOW_TRACKING_URI` names a tracking server; TensorBoard files
(`track.tensorboard`, on by default) need no server. The driver of a run creates its MLflow run
(params = the flattened resolved config, tags = lineage), rank 0 streams the per-step and eval
records of `metrics.jsonl` into it and into TensorBoard from a background thread, and the driver
ends it with the run's artifacts and status. A search is one parent run, each trial a child
(`mlflow.parentRunId`); `distilray evaluate` is a run of its own; `register_model_version` is
what `distilray promote` calls.

Why MlflowClient and not Ray's `ray.air.integrations.mlflow` (read in ray 2.60):
`MLflowLoggerCallback` runs in Tune's driver loop and logs only what trials report to Tune (the
evaluations, not per-step loss), synchronously: with the server down, MLflow's HTTP retries
(minutes by default) stall every trial; it does not exist for a plain `distilray train`.
`setup_mlflow` starts a run inside the worker through MLflow's global fluent state and logs
synchronously on the training thread; it raises when the server is unreachable, and a worker
group restarted after a failure would start a second run. Here the driver owns the run (a
restarted worker group and a rerun with the same name continue the same MLflow run, recorded in
`tracking.json`), rank 0 only queues records, and every failure is one warning, never an error.

No Ray import; `mlflow` and `tensorboardX` are imported lazily (mlflow only when tracking is on).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilray import __version__
from distilray.config import Config, TrackConfig, config_to_dict
from distilray.files import is_uri, write_json_atomic

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
TRACKING_FILE = "tracking.json"
"""In a run (or experiment) directory: the MLflow run it is logged to (uri, experiment, run id)."""
TENSORBOARD_DIR = "tensorboard"
PROBE_TIMEOUT_S = 2.0
"""How long the one check that the server answers may take before a run starts without it."""
FLUSH_TIMEOUT_S = 3.0
"""At each evaluation rank 0 waits at most this long for queued metrics to reach the server."""
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's defaults retry for minutes (and urllib3 warns at each retry); a tracking call must
fail fast and quietly (set unless already set in the environment)."""
STEP_KEYS = ("loss", "lr", "samples_per_s", "data_wait", "epoch")
"""What a `metrics.jsonl` "train" record logs (the eval record logs its eval_* and train_loss)."""
PARAM_LIMIT = 6000
"""MLflow's longest param value; longer values (a long label list) are cut."""


# --------------------------------------------------------------------------- pure parts


def tracking_uri(track: TrackConfig | str | None) -> str | None:
    """`track.mlflow`, else $MLFLOW_TRACKING_URI, else None (tracking off)."""
    if isinstance(track, str):
        return track or None
    if track is not None and track.mlflow:
        return track.mlflow
    return os.environ.get(ENV_URI) or None


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"train.lr": "2e-05", ...}; lists and dicts that are values become JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and dotted != "tune.space":
            out.update(flatten_params(value, dotted + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[dotted] = text[:PARAM_LIMIT]
    return out


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params, without the `track` section (it may hold credentials)."""
    tree = config_to_dict(cfg)
    tree.pop("track", None)
    return flatten_params(tree)


def step_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a `metrics.jsonl` train/eval record worth a metric series."""
    if record.get("event") == "train":
        keys = [k for k in STEP_KEYS if k in record]
    elif record.get("event") == "eval":
        keys = [k for k in record if k.startswith("eval_") or k == "train_loss"]
    else:
        return {}
    return {k: float(record[k]) for k in keys
            if isinstance(record[k], (int, float)) and not isinstance(record[k], bool)}


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git checkout distilray runs from, if it is one (an installed package is not)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when an http(s) tracking server answers GET /health in time, else why not."""
    if not uri.startswith(("http://", "https://")):
        return None  # a file or database store: nothing to reach
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def read_tracking(directory: str | Path) -> dict[str, Any] | None:
    """The `tracking.json` of a run / experiment / eval directory, or None."""
    if is_uri(str(directory)):
        return None
    path = Path(directory).expanduser() / TRACKING_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("run_id") else None


def find_run_id(path: str | Path) -> str | None:
    """MLflow run id of a run directory, or of the run a checkpoint directory inside it belongs to.

    For lineage: `distilray promote` links a bundle to the run that trained it.
    """
    if is_uri(str(path)):
        return None
    here = Path(path).expanduser()
    try:  # a search's best/ (or the experiment): the trial run its checkpoint came from
        best = json.loads((here / "best.json").read_text()).get("checkpoint")
        here = Path(best) if best else here
    except (OSError, ValueError, AttributeError):
        pass
    for directory in (here, here.parent):
        found = read_tracking(directory)
        if found:
            return found["run_id"]
    return None


def _set_http_env() -> None:
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------- driver side


@dataclass
class RunTracker:
    """One MLflow run as the driver sees it; every call after a failure is a no-op."""

    uri: str | None = None
    run_id: str | None = None
    experiment_id: str | None = None
    client: Any = None
    warned: bool = field(default=False)

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def worker_spec(self) -> dict[str, str] | None:
        """What rank 0 needs to log into this run (travels in `train_loop_config`)."""
        return {"uri": self.uri, "run_id": self.run_id} if self.active else None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """client.method(*args, **kwargs), or None when tracking is off or the call fails."""
        return self.guard(method, lambda: getattr(self.client, method)(*args, **kwargs))

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None (one warning, then tracking off for this run) when it fails."""
        if self.client is None:
            return None
        try:
            return fn()
        except Exception as exc:  # a tracking failure never fails the run
            self.client = None
            if not self.warned:
                self.warned = True
                log.warning("MLflow tracking at %s failed (%s: %s); the run continues without it",
                            self.uri, what, _one_line(exc))
            return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.call("log_batch", self.run_id, metrics=batch)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_file():
                self.call("log_artifact", self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self.call("log_batch", self.run_id, tags=batch)

    def end(self, status: str) -> None:
        self.call("set_terminated", self.run_id, status)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def start_run(track: TrackConfig | str | None, directory: str | Path, run_name: str,
              params: Mapping[str, str], tags: Mapping[str, Any],
              parent: Mapping[str, Any] | None = None, record: bool = True) -> RunTracker:
    """Start (or, if `directory` recorded one, continue) an MLflow run; off → an inactive tracker.

    The server is probed once (PROBE_TIMEOUT_S); unreachable, the one warning is logged here and
    the run goes on untracked. `parent`: the `tracking.json` of a search, for a trial's child run.
    `record`: keep the run id in `directory/tracking.json`, so a rerun continues the same run.
    """
    uri = (parent or {}).get("uri") or tracking_uri(track)
    if uri is None:
        return RunTracker()
    problem = probe(uri)
    if problem:
        log.warning("MLflow tracking server %s unreachable (%s); run %r continues without MLflow "
                    "tracking", uri, problem, run_name)
        return RunTracker(uri=uri, warned=True)
    _set_http_env()
    try:
        from mlflow import MlflowClient
    except ImportError:
        log.warning("MLflow tracking is on (%s) but mlflow is not installed "
                    "(pip install 'distilray[mlflow]'); run %r continues without it", uri, run_name)
        return RunTracker(uri=uri, warned=True)
    tracker = RunTracker(uri=uri, client=MlflowClient(tracking_uri=uri))
    experiment = track.experiment if isinstance(track, TrackConfig) else TrackConfig.experiment
    tracker.experiment_id = (parent or {}).get("experiment_id") or tracker.guard(
        "experiment", lambda: _experiment_id(tracker.client, experiment))
    previous = read_tracking(directory) if record else None
    if previous and previous.get("uri") == uri:
        tracker.run_id = previous["run_id"]  # the same run continues (a rerun resumes it)
        tracker.call("update_run", tracker.run_id, status="RUNNING")
        return tracker
    all_tags = {**{k: str(v) for k, v in tags.items() if v is not None},
                **({"mlflow.parentRunId": parent["run_id"]} if parent else {})}
    run = tracker.call("create_run", tracker.experiment_id, run_name=run_name, tags=all_tags)
    if run is None:
        return tracker
    tracker.run_id = run.info.run_id
    _log_params(tracker, params)
    if record and not is_uri(str(directory)):
        write_json_atomic(Path(directory) / TRACKING_FILE,
                          {"uri": uri, "experiment_id": tracker.experiment_id,
                           "run_id": tracker.run_id, "run_name": run_name})
    log.info("MLflow run %s (%s) at %s", tracker.run_id, run_name, uri)
    return tracker


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created by a concurrent trial in between
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_params(tracker: RunTracker, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        tracker.call("log_batch", tracker.run_id, params=items[start:start + 100])


def run_tags(kind: str, run_dir: str, **extra: Any) -> dict[str, Any]:
    """Lineage tags every run carries."""
    return {"distilray.kind": kind, "distilray.run_dir": run_dir, "distilray.version": __version__,
            "distilray.git_commit": git_commit(), **{f"distilray.{k}": v for k, v in extra.items()}}


def start_train_run(cfg: Config, run_dir: str, data_source: str | None = None,
                    parent: Mapping[str, Any] | None = None) -> RunTracker:
    """The MLflow run of one `distilray train` / `distill` run, or of one Tune trial."""
    kind = "trial" if parent else ("distill" if cfg.distill.teacher else "train")
    tags = run_tags(kind, run_dir, data_source=data_source, model=cfg.model.name,
                    teacher=cfg.distill.teacher)
    return start_run(cfg.track, run_dir, cfg.train.name or "train", config_params(cfg), tags, parent)


def end_train_run(tracker: RunTracker, run_dir: str, summary: Mapping[str, Any] | None) -> None:
    """Artifacts (config.yaml, result.json), the best checkpoint's metrics and FINISHED, or FAILED."""
    if not tracker.active:
        return
    if summary is None:
        tracker.end("FAILED")
        return
    best = summary.get("best_metrics") or {}
    tracker.log_metrics({f"best_{k}": v for k, v in best.items() if k.startswith("eval_")},
                        step=int(best.get("step") or 0))
    tracker.set_tags({"distilray.best_checkpoint": summary.get("best_checkpoint")})
    if not is_uri(run_dir):
        tracker.log_artifacts([Path(run_dir) / "config.yaml", Path(run_dir) / "result.json"])
    tracker.end("FINISHED")


def start_search_run(cfg: Config, exp_dir: str | Path) -> RunTracker:
    """The parent run of a `distilray tune` search (continued by `--resume`)."""
    tc = cfg.tune
    params = {f"space.{k}": json.dumps(v, sort_keys=True) for k, v in tc.space.items()}
    params.update({f"tune.{k}": str(v) for k, v in config_to_dict(cfg)["tune"].items()
                   if k not in ("space", "storage_path")})
    tags = run_tags("tune", str(exp_dir), model=cfg.model.name, data_source=cfg.data.dataset,
                    teacher=cfg.distill.teacher)
    return start_run(cfg.track, exp_dir, tc.name or "tune", params, tags)


def end_search_run(tracker: RunTracker, best: Mapping[str, Any] | None) -> None:
    """The best trial's metrics on the parent, then FINISHED (FAILED when no trial checkpointed)."""
    if not tracker.active:
        return
    if best:
        metrics = best.get("metrics") or {}
        tracker.log_metrics({f"best_{k}": v for k, v in metrics.items() if k.startswith("eval_")},
                            step=int(metrics.get("step") or 0))
        tracker.set_tags({"distilray.best_trial": best.get("trial_id"),
                          "distilray.best_checkpoint": best.get("checkpoint")})
    tracker.end("FINISHED" if best else "FAILED")


def log_evaluation(track: TrackConfig | str | None, report: Mapping[str, Any],
                   eval_json: str | Path) -> str | None:
    """`distilray evaluate` as an MLflow run: metrics, eval.json, the checkpoint's training run."""
    if tracking_uri(track) is None:
        return None
    ckpt, data = report.get("checkpoint", {}), report.get("data", {})
    params = {"checkpoint": str(ckpt.get("path")), "data": str(data.get("spec")),
              "split": str(data.get("split")), "backend": str(report.get("backend")),
              "max_length": str(report.get("max_length"))}
    tags = run_tags("evaluate", str(Path(eval_json).parent), checkpoint_sha256=ckpt.get("sha256"),
                    data_source=data.get("source"), data_sha256=data.get("sha256"),
                    source_run_id=find_run_id(ckpt.get("path", "")))
    tracker = start_run(track, Path(eval_json).parent, f"evaluate {ckpt.get('id')}", params, tags,
                        record=False)  # the checkpoint's tracking.json names its training run
    if not tracker.active:
        return None
    tracker.log_metrics({k: v for k, v in report.items() if k.startswith("eval_")})
    tracker.log_artifacts([Path(eval_json), Path(eval_json).with_suffix(".md")])
    tracker.end("FINISHED")
    return tracker.run_id if tracker.active else None


# --------------------------------------------------------------------------- model registry


def register_model_version(tracking: TrackConfig | str | None, name: str, source: str, alias: str,
                           tags: Mapping[str, str], run_id: str | None = None) -> str | None:
    """Register `source` (a bundle directory or URI) as a new version of `name` and point `alias` at it.

    Returns the MLflow version number; None (with one warning) when tracking is off or fails.
    An MLflow server refuses a local path as a version's source unless it lies in a run's
    artifacts, so for a local bundle the small files (all but the weights) are logged to a run
    and the version's source is `runs:/<run>/bundle`; tag `distilray.bundle` holds the path.
    """
    uri = tracking_uri(tracking)
    if uri is None:
        return None
    problem = probe(uri)
    if problem:
        log.warning("MLflow tracking server %s unreachable (%s); model %s not registered", uri,
                    problem, name)
        return None
    _set_http_env()
    try:
        return _register(uri, tracking, name, source, alias, dict(tags), run_id)
    except Exception as exc:
        log.warning("MLflow model registry at %s failed (%s); model %s not registered", uri,
                    _one_line(exc), name)
        return None


def _register(uri: str, tracking: Any, name: str, source: str, alias: str, tags: dict[str, str],
              run_id: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {**tags, "distilray.bundle": source}
    local = not is_uri(source) and "://" not in source
    if local:
        source, run_id = _bundle_run_source(client, uri, tracking, name, Path(source), run_id)
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    log.info("MLflow model %s version %s (%s) is now @%s", name, version.version, source, alias)
    return str(version.version)


def _bundle_run_source(client: Any, uri: str, tracking: Any, name: str, bundle: Path,
                       run_id: str | None) -> tuple[str, str]:
    """Log a local bundle's small files to a run; the version's source is then that run's copy."""
    experiment = tracking.experiment if isinstance(tracking, TrackConfig) else TrackConfig.experiment
    own = run_id is None
    if own:
        run = client.create_run(_experiment_id(client, experiment), run_name=f"register {name}",
                                tags={"distilray.kind": "register", "distilray.bundle": str(bundle)})
        run_id = run.info.run_id
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        if path.suffix in (".safetensors", ".bin", ".pt", ".onnx"):
            continue  # the weights stay in the store; the manifest names their hashes
        rel = path.relative_to(bundle).parent
        client.log_artifact(run_id, str(path), "/".join(("bundle", *rel.parts)))
    if own:
        client.set_terminated(run_id, "FINISHED")
    return f"runs:/{run_id}/bundle", run_id


# --------------------------------------------------------------------------- rank 0


class StepLogger:
    """Rank 0's sink for `metrics.jsonl` records: MLflow `log_batch` and TensorBoard, off the step.

    `__call__` only queues (a full queue drops); a daemon thread imports mlflow / tensorboardX
    and writes. A failed MLflow batch is dropped, with one warning for the first; later batches
    are still tried, so a server that comes back gets the rest of the run. Each eval record
    waits up to FLUSH_TIMEOUT_S for the queue to drain, so what a run logged reaches the server
    before its workers exit (the last record of every run is an evaluation).
    """

    def __init__(self, spec: Mapping[str, str] | None, tensorboard_dir: Path | None) -> None:
        self.spec, self.tensorboard_dir = dict(spec) if spec else None, tensorboard_dir
        self.queue: queue.Queue = queue.Queue(maxsize=10_000)
        self.warned = False
        self.thread = threading.Thread(target=self._run, name="distilray-tracking", daemon=True)
        self.thread.start()

    def __call__(self, record: Mapping[str, Any]) -> None:
        metrics = step_metrics(record)
        if not metrics:
            return
        try:
            self.queue.put_nowait((record.get("event"), int(record.get("step", 0)), metrics,
                                   int(time.time() * 1000)))
        except queue.Full:
            return
        if record.get("event") == "eval":
            self.flush(FLUSH_TIMEOUT_S)

    def flush(self, timeout: float) -> bool:
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _run(self) -> None:
        client, writer = self._open()
        while True:
            item = self.queue.get()
            items = [item]
            while len(items) < 200 and not self.queue.empty():
                items.append(self.queue.get_nowait())
            records = [i for i in items if not isinstance(i, threading.Event)]
            if client is not None and records:
                self._log_mlflow(client, records)
            if writer is not None:
                writer.write(records)
            for i in items:
                if isinstance(i, threading.Event):
                    i.set()

    def _open(self) -> tuple[Any, Any]:
        client = writer = None
        if self.tensorboard_dir is not None:
            try:
                writer = EventFile(self.tensorboard_dir)
            except Exception as exc:  # an optional nicety: never fail the run
                log.warning("TensorBoard event files off (%s)", _one_line(exc))
        if self.spec is not None:
            try:
                _set_http_env()
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=self.spec["uri"])
            except Exception as exc:
                log.warning("MLflow step logging off (%s)", _one_line(exc))
        return client, writer

    def _log_mlflow(self, client: Any, records: list[tuple[str, int, dict[str, float], int]]) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, v, ts, step) for _, step, metrics, ts in records for k, v in metrics.items()]
        try:
            for start in range(0, len(batch), 1000):  # MLflow's per-request metric limit
                client.log_batch(self.spec["run_id"], metrics=batch[start:start + 1000])
        except Exception as exc:
            if not self.warned:
                self.warned = True
                log.warning("MLflow tracking at %s failed (%s); training continues, its metrics "
                            "are dropped while the server does not answer", self.spec["uri"],
                            _one_line(exc))


class EventFile:
    """A TensorBoard event file written synchronously (the caller is already off the step).

    tensorboardX's `SummaryWriter` queues events for its own writer process-queue thread, and its
    `flush()` does not drain that queue, so the last points of a run could be lost.
    """

    def __init__(self, logdir: Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(logdir / "events"))

    def write(self, records: list[tuple[str, int, dict[str, float], int]]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for event, step, metrics, ts in records:
            for key, value in metrics.items():
                self.writer.write_event(Event(wall_time=ts / 1000, step=step,
                                              summary=scalar(f"{event}/{key}", value)))
        self.writer.flush()


def worker_sink(cfg: Config, run_dir: str, spec: Mapping[str, str] | None,
                rank: int) -> StepLogger | None:
    """Rank 0's StepLogger for this run (MLflow when the driver started a run, TensorBoard when on)."""
    if rank != 0:
        return None
    tensorboard = Path(run_dir) / TENSORBOARD_DIR if cfg.track.tensorboard and not is_uri(run_dir) \
        else None
    if spec is None and tensorboard is None:
        return None
    return StepLogger(spec, tensorboard)
