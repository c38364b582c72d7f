"""The pure parts of `distilray.tracking`: when tracking is on, what becomes params and metrics,
where a run's MLflow id is found, TensorBoard files, and failing soft without a server."""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

from distilray import tracking
from distilray.config import Config, TrackConfig, load_config
from distilray.errors import ConfigError


def read_event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files under logdir (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_is_off_unless_the_env_var_or_track_mlflow_is_set(monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    assert tracking.tracking_uri(Config().track) is None
    assert tracking.tracking_uri(None) is None and tracking.tracking_uri("") is None
    monkeypatch.setenv(tracking.ENV_URI, "http://env:5000")
    assert tracking.tracking_uri(Config().track) == "http://env:5000"
    # the config names a server explicitly: it wins over the environment
    assert tracking.tracking_uri(TrackConfig(mlflow="http://cfg:5000")) == "http://cfg:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_track_section_loads_and_rejects_unknown_keys():
    cfg = load_config(None, ["track.mlflow=http://127.0.0.1:5000", "track.experiment=sst2",
                             "track.tensorboard=false"])
    assert cfg.track == TrackConfig(mlflow="http://127.0.0.1:5000", experiment="sst2",
                                    tensorboard=False)
    assert Config().track == TrackConfig(mlflow=None, experiment="distilray", tensorboard=True)
    with pytest.raises(ConfigError, match="did you mean 'track.mlflow'"):
        load_config(None, ["track.mlfow=http://x"])


def test_params_are_the_flattened_config_without_the_track_section():
    cfg = load_config(None, ["model.name=tiny", "train.lr=3e-5", "track.mlflow=http://u:p@host"])
    params = tracking.config_params(cfg)
    assert params["model.name"] == "tiny" and params["train.lr"] == "3e-05"
    assert params["train.max_steps"] == "null" and params["train.cpu_kernels"] == "true"
    assert params["model.label_names"] == '["negative", "positive"]'
    assert json.loads(params["tune.space"])["train.lr"]["type"] == "loguniform"  # one param, as JSON
    assert not any(k.startswith("track.") for k in params)
    assert len(params) < 200 and all(isinstance(v, str) for v in params.values())
    assert tracking.flatten_params({"a": {"b": {"c": 1}}, "d": "x" * 7000}) == {
        "a.b.c": "1", "d": "x" * tracking.PARAM_LIMIT}


def test_step_metrics_take_the_series_of_train_and_eval_records():
    train = {"event": "train", "step": 3, "epoch": 0.5, "loss": 0.7, "lr": 1e-3,
             "samples_per_s": 40.0, "data_wait": 0.01, "time": 1.0}
    assert tracking.step_metrics(train) == {"loss": 0.7, "lr": 1e-3, "samples_per_s": 40.0,
                                            "data_wait": 0.01, "epoch": 0.5}
    evaluation = {"event": "eval", "step": 6, "eval_accuracy": 0.75, "eval_count": 40,
                  "train_loss": 0.6, "lr": 1e-4, "epoch": 1.0}
    assert tracking.step_metrics(evaluation) == {"eval_accuracy": 0.75, "eval_count": 40.0,
                                                 "train_loss": 0.6}
    assert tracking.step_metrics({"event": "worker", "rank": 0, "pid": 12}) == {}


def test_run_ids_are_found_from_run_checkpoint_and_best_dirs(tmp_path):
    run_dir = tmp_path / "exp" / "runs" / "t1"
    ckpt = run_dir / "checkpoint-step0000006"
    ckpt.mkdir(parents=True)
    assert tracking.find_run_id(run_dir) is None
    (run_dir / tracking.TRACKING_FILE).write_text(json.dumps({"uri": "http://x", "run_id": "abc"}))
    assert tracking.find_run_id(run_dir) == tracking.find_run_id(ckpt) == "abc"
    best = tmp_path / "exp" / "best"
    best.mkdir()
    (best / "best.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
    assert tracking.find_run_id(best) == "abc"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / tracking.TRACKING_FILE).write_text("{not json")
    assert tracking.read_tracking(tmp_path / "bad") is None
    assert tracking.find_run_id("s3://bucket/run") is None


def test_an_unreachable_server_is_one_warning_and_no_delay(tmp_path, caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    assert tracking.probe(uri) is not None
    caplog.set_level(logging.WARNING, logger="distilray.tracking")
    cfg = load_config(None, [f"track.mlflow={uri}", "train.name=r"])
    tracker = tracking.start_train_run(cfg, str(tmp_path), "synthetic:sentiment")
    assert not tracker.active and tracker.worker_spec() is None
    tracking.end_train_run(tracker, str(tmp_path), {"best_metrics": {"eval_accuracy": 1.0}})
    assert tracking.register_model_version(uri, "m", str(tmp_path), "production", {}) is None
    assert time.monotonic() - start < 2.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "continues without MLflow" in warnings[0].getMessage()
    assert "not registered" in warnings[1].getMessage()
    assert not (tmp_path / tracking.TRACKING_FILE).exists()


def test_tracking_off_logs_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    assert not tracking.start_train_run(Config(), str(tmp_path)).active
    assert tracking.register_model_version(None, "m", str(tmp_path), "production", {}) is None
    assert tracking.log_evaluation(TrackConfig(), {}, tmp_path / "eval.json") is None
    cfg = load_config(None, ["track.tensorboard=false"])
    assert tracking.worker_sink(cfg, str(tmp_path), None, rank=0) is None
    assert tracking.worker_sink(Config(), str(tmp_path), None, rank=1) is None


def test_rank0_sink_writes_tensorboard_scalars_off_the_calling_thread(tmp_path):
    sink = tracking.worker_sink(Config(), str(tmp_path), None, rank=0)
    for step in (1, 2, 3):
        sink({"event": "train", "step": step, "loss": 1.0 / step, "lr": 1e-3, "epoch": step / 3})
    sink({"event": "worker", "rank": 0})
    sink({"event": "eval", "step": 3, "eval_accuracy": 0.5, "lr": 1e-3})  # waits <= 3 s for the queue
    assert sink.flush(30.0)  # on a loaded machine the thread may still be importing tensorboardX
    scalars = read_event_scalars(tmp_path / tracking.TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["train/loss"][2][1] == pytest.approx(1 / 3)
    assert scalars["eval/eval_accuracy"] == [(3, 0.5)]
    assert "eval/lr" not in scalars


def test_a_server_dying_mid_run_is_one_warning_and_never_blocks_a_step(tmp_path, caplog):
    pytest.importorskip("mlflow")
    caplog.set_level(logging.WARNING, logger="distilray.tracking")
    spec = {"uri": f"http://127.0.0.1:{closed_port()}", "run_id": "0" * 32}
    sink = tracking.StepLogger(spec, tmp_path / tracking.TENSORBOARD_DIR)
    start = time.monotonic()
    for step in range(1, 201):
        sink({"event": "train", "step": step, "loss": 0.5})
    assert time.monotonic() - start < 0.5  # queued, not sent
    sink({"event": "eval", "step": 200, "eval_accuracy": 0.5})  # waits at most FLUSH_TIMEOUT_S
    sink({"event": "eval", "step": 201, "eval_accuracy": 0.6})
    assert time.monotonic() - start < 2 * tracking.FLUSH_TIMEOUT_S + 1
    assert sink.flush(10.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training continues" in warnings[0], warnings
    # TensorBoard keeps going without MLflow
    assert [s for s, _ in read_event_scalars(tmp_path / "tensorboard")["eval/eval_accuracy"]] == [200, 201]


def test_a_server_gone_before_the_run_ends_is_one_driver_warning(tmp_path, caplog):
    mlflow = pytest.importorskip("mlflow")
    caplog.set_level(logging.WARNING, logger="distilray.tracking")
    uri = f"http://127.0.0.1:{closed_port()}"
    tracker = tracking.RunTracker(uri=uri, run_id="0" * 32, client=mlflow.MlflowClient(uri))
    (tmp_path / "config.yaml").write_text("train: {}\n")
    summary = {"best_metrics": {"eval_accuracy": 0.5, "step": 3}, "best_checkpoint": "c"}
    tracking.end_train_run(tracker, str(tmp_path), summary)  # metrics, tags, artifacts, status
    assert not tracker.active and tracker.worker_spec() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "(log_batch: " in warnings[0], warnings
