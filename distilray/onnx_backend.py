"""ONNX Runtime engines of a checkpoint: export once, cache next to it, verify on every read.

`serve.backend` / `predict.backend` `onnx` (fp32) and `onnx-int8` (dynamic int8 weights,
per output channel) run here; `OrtEngine` maps (input_ids, attention_mask) to logits like the
torch model does, so `serve.predictor.Predictor` needs nothing else from this module.

Cache: `<checkpoint>/onnx/<variant>-<weights sha256[:16]>-ort<version>.onnx` with a JSON
manifest beside it holding the file's size and sha256; both are renamed into place (manifest
last), so a reader sees a whole file or none. A file whose size or hash does not match its
manifest (a truncated copy, a disk error) is rebuilt, never loaded. Another checkpoint or ORT
version gets another name. A read-only checkpoint directory caches under
`$DISTILRAY_CACHE/onnx/` instead. No Ray; torch, onnx and onnxruntime are imported inside.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilray.errors import CheckpointError, ConfigError
from distilray.files import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ORT_BACKENDS = ("onnx", "onnx-int8")
CACHE_DIR = "onnx"
OPSET = 17
FORMAT_VERSION = 1  # bump when the export changes, so old caches are not reused
INPUT_NAMES = ("input_ids", "attention_mask")


def ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("backend onnx / onnx-int8 needs ONNX Runtime: "
                          "pip install 'distilray[onnx]' (or set backend=torch)") from None
    return onnxruntime.__version__


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    manifest: Path


def cache_entry(checkpoint: Path, weights_sha256: str, variant: str,
                cache_dir: Path | None = None) -> CacheEntry:
    """Where `variant` (fp32 | int8 | fp32-fused | fp16 …) of these weights is cached."""
    root = cache_dir or _writable_cache_dir(checkpoint, weights_sha256)
    stem = f"{variant}-{weights_sha256[:16]}-ort{ort_version()}-v{FORMAT_VERSION}"
    return CacheEntry(root / f"{stem}.onnx", root / f"{stem}.json")


def _writable_cache_dir(checkpoint: Path, weights_sha256: str) -> Path:
    """`<checkpoint>/onnx/`, or `$DISTILRAY_CACHE/onnx/<sha>/` for a read-only checkpoint and
    for a model-store bundle (immutable: its manifest lists every file, `store.verify_bundle`)."""
    here = checkpoint / CACHE_DIR
    if not (checkpoint / "manifest.json").exists():
        try:
            here.mkdir(exist_ok=True)
            if os.access(here, os.W_OK):
                return here
        except OSError:
            pass
    root = Path(os.environ.get("DISTILRAY_CACHE") or "~/.cache/distilray").expanduser()
    fallback = root / CACHE_DIR / weights_sha256[:16]
    fallback.mkdir(parents=True, exist_ok=True)
    log.info("%s is read-only or a store bundle: caching ONNX files in %s", checkpoint, fallback)
    return fallback


def cached_file(entry: CacheEntry) -> Path | None:
    """The cached file if its size and sha256 match its manifest, else None."""
    try:
        manifest = json.loads(entry.manifest.read_text())
        if entry.path.stat().st_size == manifest["bytes"] and \
                sha256_file(entry.path) == manifest["sha256"]:
            return entry.path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if entry.path.exists() or entry.manifest.exists():
        log.warning("%s does not match its manifest (truncated or corrupt): rebuilding it",
                    entry.path)
    return None


def _publish(tmp: Path, entry: CacheEntry, **facts: Any) -> Path:
    """Rename a finished temp file into place, then write its manifest (last, atomically)."""
    os.replace(tmp, entry.path)
    write_json_atomic(entry.manifest, {"bytes": entry.path.stat().st_size,
                                       "sha256": sha256_file(entry.path), **facts})
    return entry.path


def _temp_path(entry: CacheEntry) -> Path:
    return entry.path.with_name(f".{entry.path.stem}.{os.getpid()}.{os.urandom(4).hex()}.tmp.onnx")


def export_onnx(checkpoint: Path, out: Path) -> None:
    """Export the classifier with dynamic batch and sequence axes (logits out).

    The TorchScript exporter (`dynamo=False`) needs no onnxscript; eager attention exports
    as plain MatMul/Softmax, which ORT's own graph optimiser fuses.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(checkpoint), attn_implementation="eager").eval()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {checkpoint} for ONNX export: {exc}") from None

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.full((2, 16), 1000, dtype=torch.long)
    dynamic = {"batch": 0, "sequence": 1}
    axes = {n: {v: k for k, v in dynamic.items()} for n in INPUT_NAMES}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter is marked deprecated
        torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), str(out),
                          input_names=list(INPUT_NAMES), output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)


def fuse_transformer(src: Path, out: Path, checkpoint: Path) -> None:
    """ORT's offline BERT fusions (EmbedLayerNorm, Attention, SkipLayerNorm, BiasGelu)."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(checkpoint))
    heads = getattr(cfg, "n_heads", None) or getattr(cfg, "num_attention_heads", 0)
    hidden = getattr(cfg, "dim", None) or getattr(cfg, "hidden_size", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                               opt_level=0)
    model.save_model_to_file(str(out))


def quantize_int8(src: Path, out: Path) -> None:
    """Dynamic int8 weights, one scale per output channel (per-tensor cost accuracy in torch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # it advises "pre-processing" on the root logger
    try:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.disable(logging.NOTSET)


def to_float16(src: Path, out: Path) -> None:
    """fp16 weights and activations, fp32 inputs/outputs (for ORT's CUDA provider)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))


def build_cached(checkpoint: Path, weights_sha256: str, variant: str,
                 cache_dir: Path | None = None) -> Path:
    """The verified cached file of `variant`, building it (and what it derives from) if needed.

    fp32 is the export; `int8`, `fp32-fused` and `fp16` derive from fp32 (`int8-fused`
    from `fp32-fused`).
    """
    derive = {"int8": ("fp32", quantize_int8), "fp32-fused": ("fp32", None),
              "int8-fused": ("fp32-fused", quantize_int8), "fp16": ("fp32", to_float16)}
    if variant != "fp32" and variant not in derive:
        raise ConfigError(f"unknown ONNX variant {variant!r} (have: fp32, {', '.join(derive)})")
    entry = cache_entry(checkpoint, weights_sha256, variant, cache_dir)
    found = cached_file(entry)
    if found is not None:
        return found
    tmp = _temp_path(entry)
    try:
        if variant == "fp32":
            export_onnx(checkpoint, tmp)
        else:
            base, step = derive[variant]
            src = build_cached(checkpoint, weights_sha256, base, cache_dir)
            if step is None:
                fuse_transformer(src, tmp, checkpoint)
            else:
                step(src, tmp)
        log.info("built %s", entry.path)
        return _publish(tmp, entry, variant=variant, weights_sha256=weights_sha256,
                        ort=ort_version(), format=FORMAT_VERSION)
    finally:
        tmp.unlink(missing_ok=True)


class OrtEngine:
    """(input_ids, attention_mask) int64 arrays → float32 logits, on one ORT session."""

    def __init__(self, path: Path, threads: int, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("backend onnx on a GPU needs onnxruntime-gpu (its CUDA "
                                  "provider); install it or set backend=torch")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.path = path
        self.threads = opts.intra_op_num_threads
        self.session = ort.InferenceSession(str(path), opts, providers=providers)

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        import numpy as np

        out = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(out[0], dtype=np.float32)


def ort_variant(backend: str, dtype: str, device: str) -> str:
    """The cached variant a backend/dtype/device runs, or a ConfigError saying why not."""
    if backend not in ORT_BACKENDS:
        raise ConfigError(f"{backend!r} is not an ONNX backend (have: {', '.join(ORT_BACKENDS)})")
    if dtype == "float32":
        return "int8" if backend == "onnx-int8" else "fp32"
    if backend == "onnx" and dtype == "float16" and device.startswith("cuda"):
        return "fp16"
    raise ConfigError(f"backend={backend} with dtype={dtype} is not supported: ONNX runs "
                      "float32 (and float16 with backend=onnx on a GPU); set dtype=float32 "
                      "or backend=torch")


def load_engine(checkpoint: Path, weights_sha256: str, backend: str, threads: int,
                device: str = "cpu", dtype: str = "float32") -> OrtEngine:
    variant = ort_variant(backend, dtype, device)
    return OrtEngine(build_cached(checkpoint, weights_sha256, variant), threads, device)
