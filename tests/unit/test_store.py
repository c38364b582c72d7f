"""The model store, bundles and the promotion gate, without Ray: real files, real hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilray.cli import main
from distilray.errors import BundleError, ConfigError
from distilray.lifecycle.gate import Gate, gate_failures, parse_bars
from distilray.lifecycle.promote import previous_holder, rollback
from distilray.store import (
    MANIFEST,
    ModelStore,
    parse_model_ref,
    verify_bundle,
    write_bundle,
)
from tests.conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-step0000001", "tiny-a")
    (path / "training_state.pt").write_bytes(b"optimizer state")  # must not reach a bundle
    return path


def _eval(acc: float, sha: str = "rows-a", **extra: float) -> dict:
    return {"eval_accuracy": acc, "eval_macro_f1": acc - 0.01, "eval_loss": 1 - acc,
            "eval_ece": 0.05, "eval_count": 872, "data": {"sha256": sha, "spec": "sst2"}, **extra}


def _publish(store: ModelStore, ckpt: Path, acc: float = 0.8) -> str:
    return store.publish("sst2", lambda d: write_bundle(ckpt, d, {"eval.json": _eval(acc)}))


def test_bundle_holds_the_model_without_optimizer_state_and_a_manifest_of_every_file(tiny_ckpt, tmp_path):
    manifest = write_bundle(tiny_ckpt, tmp_path / "b", {"eval.json": _eval(0.9), "eval.md": "# eval"})
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "training_state.pt" not in names and MANIFEST in names
    assert set(manifest["files"]) == set(names) - {MANIFEST}
    assert {"config.json", "model.safetensors", "distilray.json", "eval.json"} <= set(names)
    assert verify_bundle(tmp_path / "b")["files"] == manifest["files"]
    from transformers import pipeline  # the bundle is a Hugging Face model directory as is

    out = pipeline("text-classification", model=str(tmp_path / "b"))("fine")
    assert out[0]["label"] in ("negative", "positive")


def test_a_flipped_byte_is_refused_naming_the_file_and_both_hashes(tiny_ckpt, tmp_path):
    write_bundle(tiny_ckpt, tmp_path / "b", {})
    weights = tmp_path / "b" / "model.safetensors"
    expected = json.loads((tmp_path / "b" / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        verify_bundle(tmp_path / "b")
    import hashlib

    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert "model.safetensors" in str(err.value) and expected in str(err.value) and actual in str(err.value)


def test_missing_extra_and_unlisted_files_are_refused(tiny_ckpt, tmp_path):
    write_bundle(tiny_ckpt, tmp_path / "b", {})
    (tmp_path / "b" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list: pytorch_model.bin"):
        verify_bundle(tmp_path / "b")
    (tmp_path / "b" / "pytorch_model.bin").unlink()
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json: missing"):
        verify_bundle(tmp_path / "b")
    (tmp_path / "b" / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        verify_bundle(tmp_path / "b")


def test_versions_aliases_history_and_rollback(tiny_ckpt, tmp_path):
    store = ModelStore(str(tmp_path / "store"))
    assert _publish(store, tiny_ckpt) == "v1" and _publish(store, tiny_ckpt) == "v2"
    assert store.versions("sst2") == ["v1", "v2"] and store.names() == ["sst2"]
    assert store.set_alias("sst2", "production", "v1", "promote") is None
    assert store.set_alias("sst2", "production", "v2", "promote") == "v1"
    assert store.resolve("sst2", "production") == "v2" and store.resolve("sst2", "v1") == "v1"
    out = rollback(str(tmp_path / "store"), "sst2")
    assert (out["version"], out["previous"]) == ("v1", "v2")
    assert store.aliases("sst2") == {"production": "v1"}
    assert [(h["action"], h["version"], h["previous"]) for h in store.history("sst2")] == [
        ("promote", "v1", None), ("promote", "v2", "v1"), ("rollback", "v1", "v2")]
    with pytest.raises(BundleError, match="no such alias"):
        store.resolve("sst2", "staging")
    with pytest.raises(BundleError, match=r"no such version \(versions: v1, v2\)"):
        store.resolve("sst2", "v9")
    with pytest.raises(ConfigError, match="already points at v1"):
        rollback(str(tmp_path / "store"), "sst2", to="v1")


def test_a_half_written_version_is_invisible_and_a_leftover_temp_dir_is_ignored(tiny_ckpt, tmp_path):
    store = ModelStore(str(tmp_path / "store"))
    (tmp_path / "store" / "sst2" / "v1").mkdir(parents=True)  # a copy without its manifest
    (tmp_path / "store" / "sst2" / ".sst2-incoming-x").mkdir()

    def crash(d: Path) -> None:
        write_bundle(tiny_ckpt, d, {})
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        store.publish("sst2", crash)
    assert store.versions("sst2") == []
    assert _publish(store, tiny_ckpt) == "v2"  # v1 is taken on disk, so the next number
    assert store.versions("sst2") == ["v2"]


def test_promoting_the_same_weights_twice_reuses_the_version(tiny_ckpt, tmp_path):
    store = ModelStore(str(tmp_path / "store"))
    v = _publish(store, tiny_ckpt)
    sha = store.manifest("sst2", v)["files"]["model.safetensors"]["sha256"]
    assert store.find_weights("sst2", sha) == "v1" and store.find_weights("sst2", "0" * 64) is None


def test_a_remote_store_uploads_the_manifest_last_and_verifies_its_download(tiny_ckpt, tmp_path):
    from pyarrow._fs import _MockFileSystem

    fs = _MockFileSystem()
    fs.create_dir("bucket/models")
    store = ModelStore.from_filesystem(fs, "bucket/models", "mock://bucket/models")
    assert _publish(store, tiny_ckpt) == "v1"
    store.set_alias("sst2", "production", "v1", "promote")
    assert store.resolve("sst2", "production") == "v1" and len(store.history("sst2")) == 1
    local = store.local_bundle("sst2", "v1", cache_dir=tmp_path / "cache")
    assert verify_bundle(local) and (local / "model.safetensors").exists()
    (local / "model.safetensors").write_bytes(b"truncated")  # a corrupt cached copy
    again = store.local_bundle("sst2", "v1", cache_dir=tmp_path / "cache")
    assert verify_bundle(again)["files"]["model.safetensors"]["size"] > 100


def test_model_refs():
    ref = parse_model_ref("/srv/models/sst2@production")
    assert (ref.store, ref.name, ref.ref) == ("/srv/models", "sst2", "production")
    assert parse_model_ref("s3://b/m/sst2@v3").store == "s3://b/m"
    assert parse_model_ref("sst2", store="/s").ref is None
    for bad, message in [("sst2@", "nothing after"), ("/s/sst2@V3", "neither a version"),
                         ("/s/bad name", "model name"), ("sst2@prod", "names no store")]:
        with pytest.raises(ConfigError, match=message):
            parse_model_ref(bad)


def test_gate_names_each_failed_bar_with_both_numbers():
    gate = Gate(minimum=parse_bars(["eval_accuracy=0.85"]), maximum={"eval_ece": 0.04},
                tolerance=0.005)
    fails = gate_failures(gate, _eval(0.80), _eval(0.86))
    assert fails == ["eval_accuracy 0.8000 is below the bar 0.8500",
                     "eval_ece 0.0500 is above the bar 0.0400",
                     "eval_accuracy 0.8000 is worse than production's 0.8600 by 0.0600 (tolerance 0.0050)"]
    assert gate_failures(Gate(tolerance=0.005), _eval(0.856), _eval(0.86)) == []  # within tolerance
    assert gate_failures(Gate(), _eval(0.9), None) == []
    lossy = gate_failures(Gate(compare=("eval_loss",)), _eval(0.8), _eval(0.9))
    assert lossy == ["eval_loss 0.2000 is worse than production's 0.1000 by 0.1000 (tolerance 0.0000)"]
    with pytest.raises(ConfigError, match="eval_acc, which the evaluation does not report"):
        gate_failures(Gate(minimum={"eval_acc": 0.8}), _eval(0.9), None)
    with pytest.raises(ConfigError, match="different rows"):
        gate_failures(Gate(), _eval(0.9), _eval(0.8, sha="rows-b"))
    with pytest.raises(ConfigError, match="expected METRIC=NUMBER"):
        parse_bars(["eval_accuracy"])
    assert previous_holder([{"alias": "production", "version": "v2", "previous": "v1"}],
                           "production", "v2") == "v1"


def test_models_cli_lists_shows_and_rolls_back(tiny_ckpt, tmp_path, capsys):
    store = ModelStore(str(tmp_path / "store"))
    for _ in range(2):
        store.set_alias("sst2", "production", _publish(store, tiny_ckpt), "promote")
    capsys.readouterr()
    assert main(["models", "list", "--store", str(tmp_path / "store")]) == 0
    assert "sst2\t2 version(s), latest v2\tproduction→v2" in capsys.readouterr().out
    assert main(["models", "show", f"{tmp_path}/store/sst2@production"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sst2@v2") and "eval_accuracy 0.8000" in out
    assert main(["models", "rollback", "sst2", "--store", str(tmp_path / "store")]) == 0
    assert "sst2@production → v1 (was v2)" in capsys.readouterr().out
    assert main(["models", "show", "sst2@v7", "--store", str(tmp_path / "store")]) == 2
    assert "no such version" in capsys.readouterr().err


def test_serve_refuses_a_tampered_version_before_deploying(tiny_ckpt, tmp_path, capsys):
    store = ModelStore(str(tmp_path / "store"))
    store.set_alias("sst2", "production", _publish(store, tiny_ckpt), "promote")
    weights = tmp_path / "store" / "sst2" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["serve", "--model", f"{tmp_path}/store/sst2@production"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: sha256" in err and "does not match the manifest" in err


def test_emitted_serve_config_keeps_the_alias_for_every_deploy_to_resolve(tmp_path):
    import yaml

    out = tmp_path / "serve.yaml"
    assert main(["serve", "--model", "/models/sst2@production", "--emit-config", str(out)]) == 0
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["args"]["model"] == "/models/sst2@production" and "checkpoint" not in app["args"]
    from distilray.serve.app import serve_config_from_args

    assert serve_config_from_args(app["args"])[0] is None
    with pytest.raises(ConfigError, match="exactly one of 'checkpoint'"):
        serve_config_from_args({"checkpoint": "/x", "model": "/m/a@v1"})


def test_pipeline_run_names_are_unique_and_its_config_is_checked_before_any_run(tmp_path, capsys):
    from distilray.config import load_config
    from distilray.lifecycle.pipeline import check_pipeline, unique_run_name

    names = {unique_run_name("sst2", now=0) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("sst2-19700101-000000-") for n in names)
    with pytest.raises(ConfigError) as err:
        check_pipeline(load_config(None, ["pipeline.name=bad name", "pipeline.distill=true",
                                          "distill.teacher=/t"]))
    text = str(err.value)
    assert "pipeline.store is not set" in text and "bad name" in text and "leave distill.teacher unset" in text
    assert main(["pipeline", "--dry-run", "--store", str(tmp_path / "store"), "--name", "sst2",
                 "--set", "pipeline.distill=true", "--set", "pipeline.minimum={eval_accuracy: 0.85}"]) == 0
    out = capsys.readouterr().out
    assert f"train → distill → evaluate + gate → promote to {tmp_path}/store/sst2@production" in out
    assert not (tmp_path / "store").exists()  # a dry run writes nothing


def test_an_onnx_backend_never_writes_into_a_bundle(tiny_ckpt, tmp_path, monkeypatch):
    from distilray.serve.predictor import Predictor

    monkeypatch.setenv("DISTILRAY_CACHE", str(tmp_path / "cache"))
    store = ModelStore(str(tmp_path / "store"))
    version = _publish(store, tiny_ckpt)
    bundle = store.local_bundle("sst2", version)
    pred = Predictor(str(bundle), max_length=64, backend="onnx")
    torch_pred = Predictor(str(bundle), max_length=64)
    assert [p.label for p in pred.predict(["fine", "awful"])] == \
        [p.label for p in torch_pred.predict(["fine", "awful"])]
    assert verify_bundle(bundle)  # still exactly its manifest's files
    assert list((tmp_path / "cache" / "onnx").rglob("*.onnx"))
