"""ONNX Runtime backends on a tiny checkpoint: same logits as torch, a verified cache, clear
errors for what cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distilray import onnx_backend
from distilray.config import load_config
from distilray.errors import ConfigError
from distilray.serve import predictor as predictor_module
from distilray.serve.predictor import Predictor
from tests.conftest import save_tiny_checkpoint

pytest.importorskip("onnxruntime")

TEXTS = ["a charming and often affecting journey .", "bad", "unflinchingly bleak and desperate",
         "the plot was not boring at all , but the ending was utterly forgettable and the cast "
         "seemed tired of the whole thing by the second act .", "ok"] * 3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("onnx-tiny"), "onnx-tiny", seed=5)


@pytest.fixture(scope="module")
def torch_logits(tiny_checkpoint):
    return Predictor(str(tiny_checkpoint), max_length=64).logits(TEXTS)


def cached(checkpoint, variant):
    return sorted((checkpoint / onnx_backend.CACHE_DIR).glob(f"{variant}-*.onnx"))


def test_onnx_matches_torch_and_int8_stays_close(tiny_checkpoint, torch_logits):
    onnx = Predictor(str(tiny_checkpoint), max_length=64, backend="onnx", torch_threads=1)
    assert onnx.model is None and onnx.engine.threads == 1
    np.testing.assert_allclose(onnx.logits(TEXTS), torch_logits, atol=1e-4)
    assert [p.label for p in onnx.predict(TEXTS)] == [
        p.label for p in Predictor(str(tiny_checkpoint), max_length=64).predict(TEXTS)]
    int8 = Predictor(str(tiny_checkpoint), max_length=64, backend="onnx-int8").logits(TEXTS)
    assert int8.shape == torch_logits.shape
    assert 0 < np.abs(int8 - torch_logits).max() < 0.1  # quantised: close, not equal
    [fp32_file], [int8_file] = cached(tiny_checkpoint, "fp32"), cached(tiny_checkpoint, "int8")
    assert int8_file.stat().st_size < fp32_file.stat().st_size
    manifest = json.loads(int8_file.with_suffix(".json").read_text())
    assert manifest["bytes"] == int8_file.stat().st_size and manifest["variant"] == "int8"


def test_truncated_cache_is_detected_and_rebuilt(tiny_checkpoint, torch_logits):
    Predictor(str(tiny_checkpoint), max_length=64, backend="onnx")
    [path] = cached(tiny_checkpoint, "fp32")
    whole = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(whole // 2)
    entry = onnx_backend.CacheEntry(path, path.with_suffix(".json"))
    assert onnx_backend.cached_file(entry) is None
    rebuilt = Predictor(str(tiny_checkpoint), max_length=64, backend="onnx")
    assert path.stat().st_size == whole and onnx_backend.cached_file(entry) == path
    np.testing.assert_allclose(rebuilt.logits(TEXTS), torch_logits, atol=1e-4)
    # same size, other bytes: the hash catches it
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert onnx_backend.cached_file(entry) is None
    Predictor(str(tiny_checkpoint), max_length=64, backend="onnx")
    assert onnx_backend.cached_file(entry) == path
    assert not list(path.parent.glob(".*.tmp*")), "temp files left behind"


def test_cache_key_names_weights_and_ort_version(tiny_checkpoint, tmp_path):
    import onnxruntime

    entry = onnx_backend.cache_entry(tiny_checkpoint, "ab" * 32, "int8", cache_dir=tmp_path)
    assert entry.path.parent == tmp_path
    assert f"int8-{'ab' * 8}-ort{onnxruntime.__version__}" in entry.path.name


def test_half_precision_is_refused_on_cpu(tiny_checkpoint):
    with pytest.raises(ConfigError, match="dtype=bfloat16 needs a CUDA GPU"):
        Predictor(str(tiny_checkpoint), dtype="bfloat16")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["serve.dtype=float16", "predict.dtype=bfloat16"])
    assert "serve.dtype=float16 needs a GPU" in str(err.value)
    assert "predict.dtype=bfloat16 needs a GPU" in str(err.value)
    assert load_config(None, ["serve.dtype=bfloat16", "serve.num_gpus=1"]).serve.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="not supported"):
        onnx_backend.ort_variant("onnx-int8", "float16", "cuda")


def test_torch_int8_without_the_api_names_onnx_int8(tiny_checkpoint, monkeypatch):
    assert predictor_module.torch_int8_available()  # torch 2.13 still has it
    monkeypatch.setattr(predictor_module, "torch_int8_available", lambda: False)
    with pytest.raises(ConfigError, match="backend=onnx-int8"):
        Predictor(str(tiny_checkpoint), backend="int8")
