"""The model lifecycle on a real local Ray cluster: promotion behind the gate on SST-2, a
tampered bundle refused by the replicas, and a running app moved to a new version under load."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from distilray.cli import main
from distilray.store import MANIFEST, ModelStore
from tests.conftest import free_port, save_tiny_checkpoint
from tests.ray.test_serve import Load

pytestmark = pytest.mark.ray
TINY_EVAL = ["--eval-data", "synthetic:sentiment", "--set", "data.synthetic_size=300",
             "--set", "data.max_length=64"]


def weak_minilm(path: Path) -> Path:
    """offline:minilm with an untrained classification head: a deliberately weaker model."""
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    source = resolve_model("offline:minilm")
    load_classifier(source, ["negative", "positive"], seed=3).save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    (path / "distilray.json").write_text(json.dumps({
        "run_name": "untrained-head", "step": 0, "model_name": "offline:minilm", "max_length": 128,
        "label_names": ["negative", "positive"]}))
    return path


@pytest.mark.slow
@pytest.mark.timeout(3000)  # may train the session's SST-2 teacher and student first
def test_gate_promotes_refuses_and_rolls_back_on_sst2(ray_4_cpus, sst2_student, sst2_checkpoint,
                                                      sst2_dir, tmp_path, capsys):
    store = str(tmp_path / "store")
    gate = ["--to", store, "--name", "sst2", "--eval-data", str(sst2_dir), "--min", "eval_accuracy=0.80"]
    # v1: the distilled student (from the session fixture)
    assert main(["promote", "--checkpoint", sst2_student["best_checkpoint"], *gate]) == 0
    out = capsys.readouterr().out
    assert "stored as v1" in out and "sst2@production → v1" in out, out
    s = ModelStore(store)
    v1_acc = s.read_json("sst2", "v1", "eval.json")["eval_accuracy"]
    assert v1_acc >= 0.80 and s.read_json("sst2", "v1", "eval.json")["eval_count"] == 872

    # a deliberately weaker model: refused with both numbers, nothing changes
    weak = weak_minilm(tmp_path / "weak")
    assert main(["promote", "--checkpoint", str(weak), *gate]) == 1
    err = capsys.readouterr().err
    assert "promotion refused, nothing changed" in err and "is below the bar 0.8000" in err, err
    assert f"worse than production (sst2@v1)'s {v1_acc:.4f}" in err, err
    assert s.versions("sst2") == ["v1"] and s.aliases("sst2") == {"production": "v1"}
    assert len(s.history("sst2")) == 1

    # the teacher is better: v2; rollback returns to v1
    assert main(["promote", "--checkpoint", sst2_checkpoint, *gate]) == 0
    out = capsys.readouterr().out
    assert "stored as v2" in out and "production was v1" in out, out
    v2 = s.read_json("sst2", "v2", "eval.json")
    assert v2["eval_accuracy"] >= v1_acc and s.aliases("sst2") == {"production": "v2"}
    lineage = s.read_json("sst2", "v2", "lineage.json")
    assert lineage["source"]["run_name"] == "sst2-minilm"
    assert lineage["config"]["data"]["dataset"] == str(sst2_dir)
    assert any(name.startswith("train") for name in lineage["data"]["train"]["files"])
    assert lineage["data"]["eval"]["sha256"] == v2["data"]["sha256"]
    student_lineage = s.read_json("sst2", "v1", "lineage.json")
    assert student_lineage["teacher"] == sst2_checkpoint
    assert not (Path(store) / "sst2" / "v2" / "training_state.pt").exists()
    assert main(["models", "rollback", "sst2", "--store", store]) == 0
    assert "sst2@production → v1 (was v2)" in capsys.readouterr().out
    assert [h["action"] for h in s.history("sst2")] == ["promote", "promote", "rollback"]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, ray_4_cpus) -> str:
    """A store with tiny@v1 = production, promoted through the CLI (gate and all)."""
    root = tmp_path_factory.mktemp("tiny-store")
    ckpt = save_tiny_checkpoint(root / "ckpt-a", "tiny-a", seed=1)
    assert main(["promote", "--checkpoint", str(ckpt), "--to", str(root / "store"),
                 "--name", "tiny", *TINY_EVAL]) == 0
    return str(root / "store")


def serve_cfg(port: int, app: str, *extra: str):
    from distilray.config import load_config

    return load_config(None, [f"serve.port={port}", f"serve.app_name={app}",
                              f"serve.route_prefix=/{app}", "serve.num_cpus=0.5",
                              "serve.max_length=64", "serve.health_check_period_s=1", *extra])


def test_a_tampered_bundle_never_becomes_ready(tiny_store, tmp_path):
    from ray import serve

    from distilray.serve.app import build_app
    from distilray.serve.lifecycle import http_options

    store = tmp_path / "copy"
    shutil.copytree(tiny_store, store)
    weights = store / "tiny" / "v1" / "model.safetensors"
    expected = json.loads((weights.parent / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    cfg = serve_cfg(free_port(), "tampered")
    serve.start(http_options=http_options(cfg.serve))
    port = serve.context._get_global_client().http_config.port
    app = build_app({"model": f"{store}/tiny@production", "serve": {"max_length": 64, "num_cpus": 0.5}})
    try:
        with pytest.raises(RuntimeError, match="failed"):  # Serve gives up on the replicas
            serve.run(app, name="tampered", route_prefix="/tampered", blocking=False)
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            status = serve.status().applications["tampered"]
            if status.status == "DEPLOY_FAILED":
                break
            r = requests.get(f"http://127.0.0.1:{port}/tampered/readyz", timeout=10)
            assert r.status_code != 200, "a tampered bundle answered ready"
            time.sleep(1)
        assert status is not None and status.status == "DEPLOY_FAILED", status
        message = " ".join([status.message] + [d.message for d in status.deployments.values()])
        assert "model.safetensors" in message and expected in message and actual in message, message
        r = requests.post(f"http://127.0.0.1:{port}/tampered/v1/classify", json={"text": "fine"}, timeout=10)
        assert r.status_code != 200
    finally:
        serve.delete("tampered")


class VersionLoad(Load):
    """`Load` (test_serve's closed-loop clients) recording (start, end, status, version) of each."""

    def __init__(self, url: str, workers: int):
        super().__init__(url, workers, {"texts": ["a fine film", "dull"]})
        self.records: list[tuple[float, float, int, str | None]] = []
        self.errors: Counter[str] = Counter()  # the bodies of the answers that were not 200

    def _worker(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = session.post(f"{self.url}/v1/classify", json=self.body, timeout=30)
                    version = r.json().get("version") if r.status_code == 200 else None
                    if r.status_code != 200:
                        self.errors[f"{r.status_code} {r.text[:200]}"] += 1
                    self.records.append((t0, time.monotonic(), r.status_code, version))
                except requests.RequestException as exc:
                    self.errors[type(exc).__name__] += 1
                    self.records.append((t0, time.monotonic(), -1, None))


def test_promote_deploy_moves_a_running_app_under_load_without_a_failed_request(tiny_store, tmp_path, capsys):
    from ray import serve

    from distilray.serve.app import pin_bundle
    from distilray.serve.lifecycle import start_server

    # one Classifier replica (and one surge replica during the switch): the version change,
    # not the autoscaler, under test
    cfg = serve_cfg(free_port(), "lifecycle", "serve.max_replicas=1")
    url = start_server(cfg, None, pin_bundle(f"{tiny_store}/tiny@production"))
    port = serve.context._get_global_client().http_config.port
    assert requests.get(f"{url}/v1/model", timeout=10).json()["version"] == "tiny@v1"
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt-b", "tiny-b", seed=2)
    try:
        with VersionLoad(url, workers=16) as load:
            started = time.monotonic()
            time.sleep(8)
            assert main(["promote", "--checkpoint", str(ckpt), "--to", tiny_store, "--name", "tiny",
                         "--tolerance", "1.0", "--deploy", *TINY_EVAL,
                         "--set", f"serve.port={port}", "--set", "serve.app_name=lifecycle",
                         "--set", "serve.route_prefix=/lifecycle", "--set", "serve.num_cpus=0.5",
                         "--set", "serve.max_length=64", "--set", "serve.health_check_period_s=1",
                         "--set", "serve.max_replicas=1"]) == 0
            switched = time.monotonic()
            time.sleep(max(8.0, 30 - (switched - started)))
        out = capsys.readouterr().out
        assert "deployed tiny@v2 to lifecycle" in out, out
        versions = Counter(v for _, _, _, v in load.records)
        print(f"{len(load.records)} requests over {load.records[-1][1] - started:.1f}s, "
              f"switch took {switched - started - 8:.1f}s: {dict(versions)}")
        for error, n in load.errors.most_common(5):
            print(f"{n} × {error}")
        late = sorted(round(t0 - started, 1) for t0, _, code, _ in load.records if code != 200)
        print("not 200, seconds after the load started:", late[:10], "…", late[-10:])
        codes = Counter(code for _, _, code, _ in load.records)
        assert codes == {200: len(load.records)}, (codes, load.errors.most_common(5))
        assert load.records[-1][1] - started >= 30 and len(load.records) >= 200
        assert set(versions) == {"tiny@v1", "tiny@v2"}, versions
        after = Counter(v for t0, _, _, v in load.records if t0 > switched)
        assert set(after) == {"tiny@v2"} and after["tiny@v2"] >= 50, after
        assert requests.get(f"{url}/v1/model", timeout=10).json()["version"] == "tiny@v2"
        assert ModelStore(tiny_store).aliases("tiny") == {"production": "v2"}
    finally:
        serve.delete("lifecycle")


def test_a_version_change_without_room_for_a_surge_replica_still_goes_through(ray_4_cpus, tmp_path, caplog):
    """2.6 of the 4 CPUs held: the 2.6 more that a surge needs are not free, so the change
    runs without one (Serve would leave the surge replicas pending, and the change unfinished)."""
    from ray import serve

    from distilray.serve.lifecycle import start_server

    cfg = serve_cfg(free_port(), "nosurge", "serve.num_cpus=2.5")
    first = save_tiny_checkpoint(tmp_path / "a", "tiny-a", seed=1)
    second = save_tiny_checkpoint(tmp_path / "b", "tiny-b", seed=2)
    url = start_server(cfg, str(first))
    try:
        before = requests.get(f"{url}/v1/model", timeout=10).json()["checkpoint"]["id"]
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="distilray.serve.lifecycle"):
            assert start_server(cfg, str(second)) == url
        assert time.monotonic() - t0 < 120
        assert "no room for the extra replicas of serve.max_surge_percent=25" in caplog.text, caplog.text
        free = re.search(r"2\.6 CPU \(free: ([0-9.]+)\)", caplog.text)
        assert free and float(free.group(1)) < 2.6, caplog.text  # 1.4 when nothing else runs
        after = requests.get(f"{url}/v1/model", timeout=10).json()["checkpoint"]["id"]
        assert after != before
        deployments = serve.status().applications["nosurge"].deployments
        assert {name: dict(d.replica_states) for name, d in deployments.items()} == {
            "Ingress": {"RUNNING": 1}, "Classifier": {"RUNNING": 1}}
    finally:
        serve.delete("nosurge")


def test_the_pipeline_runs_twice_in_a_row_with_distinct_names(ray_4_cpus, tmp_path, capsys):
    store, runs = tmp_path / "store", tmp_path / "runs"
    sets = ["model.name=tiny", "model.dropout=0.0", "data.dataset=synthetic:sentiment",
            "data.synthetic_size=400", "data.max_length=64", "train.lr=1e-3", "train.epochs=1",
            "train.max_failures=0", "train.log_every_steps=100", "pipeline.tolerance=0.2"]
    argv = ["pipeline", "--store", str(store), "--name", "tiny", "--storage-path", str(runs),
            "--workers", "1", *(arg for s in sets for arg in ("--set", s))]
    records = []
    for _ in range(2):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "pipeline: train → evaluate + gate → promote to" in out, out
        (record_file,) = {Path(p) for p in runs.glob("*/pipeline.json")} - {Path(r["file"]) for r in records}
        records.append(json.loads(record_file.read_text()))
    first, second = records
    assert first["name"] != second["name"] and all(r["result"] == "promoted" for r in records)
    assert [s["stage"] for s in first["stages"]] == ["train", "promote"]
    assert Path(first["stages"][0]["run_dir"]).name == first["name"]
    s = ModelStore(str(store))
    assert s.aliases("tiny")["production"] == second["promoted"]["version"]
    assert len(s.history("tiny")) == len(set(s.versions("tiny"))) >= 1
