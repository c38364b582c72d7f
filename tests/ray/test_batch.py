"""Batch inference and evaluation on a real local Ray: Ray Data actors, real files, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from distilray.batch import evaluation
from distilray.batch.jobs import evaluate_checkpoint, predict_files
from distilray.cli import main
from distilray.config import load_config
from distilray.data import generate_synthetic_sentiment
from distilray.serve.predictor import Predictor
from tests.conftest import save_tiny_checkpoint

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-batch-ckpt"), "batch", seed=5)


def _read_output(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))],
                            promote_options="default")


def test_predict_keeps_every_column_and_row_order_and_flags_bad_rows(ray_4_cpus, tiny_checkpoint, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    synth = generate_synthetic_sentiment(300, seed=2)
    pq.write_table(synth.slice(0, 200).append_column("id", pa.array(range(200))), inp / "a.parquet")
    pq.write_table(synth.slice(200, 100).append_column("id", pa.array(range(200, 300))), inp / "b.parquet")
    bad = [{"id": 300, "text": ""}, {"id": 301, "text": None}, {"id": 302, "text": 7},
           {"id": 303, "text": "long " * 4000}, {"id": 304, "text": "a fine and moving film"}]
    (inp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    cfg = load_config(None, ["predict.batch_size=64"])

    summary = predict_files(cfg, str(tiny_checkpoint), str(inp), str(tmp_path / "out"))

    # the 20,000-character text is truncated to max_length tokens, not refused
    assert (summary["rows"], summary["predicted"], summary["errors"], summary["files"]) == (305, 302, 3, 3)
    assert json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["rows"] == 305
    a = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    # the file's own label stays; the model's goes beside it
    assert a.column_names == ["text", "label", "id", "predicted_label", "score", "probabilities", "error"]
    assert a.column("id").to_pylist() == list(range(200))
    assert a.column("text").to_pylist() == synth.column("text").to_pylist()[:200]
    reference = Predictor(str(tiny_checkpoint), max_length=64).predict(a.column("text").to_pylist())
    assert a.column("label").to_pylist() == synth.column("label").to_pylist()[:200]
    assert a.column("predicted_label").to_pylist() == [p.label for p in reference]
    np.testing.assert_allclose(np.asarray(a.column("probabilities").to_pylist())[:, 1],
                               [p.probabilities["positive"] for p in reference], atol=1e-5)
    c = [json.loads(line) for line in (tmp_path / "out" / "part-00002.jsonl").read_text().splitlines()] \
        if (tmp_path / "out" / "part-00002.jsonl").exists() else \
        pq.read_table(tmp_path / "out" / "part-00002.parquet").to_pylist()
    assert [r["id"] for r in c] == [300, 301, 302, 303, 304]
    assert [r["error"] is None for r in c] == [False, False, False, True, True]
    assert [r["label"] is None for r in c] == [True, True, True, False, False]
    assert "not a string" in c[2]["error"]
    long_ref = Predictor(str(tiny_checkpoint), max_length=64).predict(["long " * 4000])[0]
    assert c[3]["label"] == long_ref.label
    assert c[3]["probabilities"][1] == pytest.approx(long_ref.probabilities["positive"], abs=1e-5)


def test_a_killed_job_resumes_with_exactly_one_row_per_input(ray_4_cpus, tiny_checkpoint, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    synth = generate_synthetic_sentiment(4800, seed=3).append_column("id", pa.array(range(4800)))
    for i in range(12):
        pq.write_table(synth.slice(i * 400, 400), inp / f"part{i:02d}.parquet")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "distilray", "predict", "--checkpoint", str(tiny_checkpoint),
            "--input", str(inp), "--output", str(out), "--set", "predict.batch_size=16"]
    env = {**os.environ, "RAY_ADDRESS": ray_4_cpus.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"  # a file, not a pipe: a full pipe would stall the driver
    with open(log, "w") as sink:
        driver = subprocess.Popen(args, env=env, start_new_session=True, stdout=sink, stderr=sink)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not list(out.glob("part-*.parquet.json")):
            assert driver.poll() is None, log.read_text()[-3000:]
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = len(list(out.glob("part-*.parquet.json")))
    assert 1 <= done_before < 12, f"{done_before} shards were done when the driver was killed"
    assert not (out / "_SUCCESS.json").exists()

    rc = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-3000:]
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["shards_resumed"] >= done_before and summary["rows"] == 4800
    ids = _read_output(out).column("id").to_pylist()
    assert ids == list(range(4800))  # no row lost, none twice, input order kept
    assert not list(out.glob(".*tmp")), "a temp file was left behind"


@pytest.mark.slow
def test_predict_matches_transformers_pipeline_on_sst2_and_imdb(ray_4_cpus, sst2_checkpoint, sst2_dir,
                                                                imdb_dir, tmp_path):
    from transformers import pipeline

    inp = tmp_path / "in"
    inp.mkdir()
    sst2 = pq.read_table(sst2_dir / "validation.parquet")
    imdb = pq.read_table(imdb_dir / "test.parquet").slice(0, 300)  # 161 positive, 139 negative
    pq.write_table(sst2, inp / "sst2.parquet")
    pq.write_table(imdb, inp / "imdb.parquet")
    assert main(["predict", "--checkpoint", sst2_checkpoint, "--input", str(inp), "--output",
                 str(tmp_path / "out"), "--set", "predict.max_actors=2"]) == 0
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    assert (summary["rows"], summary["errors"]) == (sst2.num_rows + 300, 0)
    pipe = pipeline("text-classification", model=sst2_checkpoint, top_k=None, device="cpu",
                    truncation=True, max_length=128)
    for shard, source in (("part-00000.parquet", imdb), ("part-00001.parquet", sst2)):
        out = pq.read_table(tmp_path / "out" / shard)
        assert out.column_names[:len(source.column_names)] == source.column_names
        assert out.column("text").to_pylist() == source.column("text").to_pylist()
        reference = pipe(source.column("text").to_pylist(), batch_size=32)
        assert out.column("label").to_pylist() == source.column("label").to_pylist()
        assert out.column("predicted_label").to_pylist() == [max(r, key=lambda d: d["score"])["label"]
                                                             for r in reference]
        ref_pos = np.asarray([{d["label"]: d["score"] for d in r}["positive"] for r in reference])
        np.testing.assert_allclose(np.asarray(out.column("probabilities").to_pylist())[:, 1], ref_pos,
                                   atol=1e-4)


@pytest.mark.slow
def test_evaluate_reproduces_training_accuracy_and_is_deterministic(ray_4_cpus, sst2_run, sst2_dir,
                                                                   tmp_path):
    cfg = load_config(None)
    first = evaluate_checkpoint(cfg, sst2_run["best_checkpoint"], str(sst2_dir), "validation",
                                output=str(tmp_path / "a"))
    trained = sst2_run["best_metrics"]["eval_accuracy"]
    assert first["eval_count"] == 872
    assert abs(first["eval_accuracy"] - trained) <= 1e-6, (first["eval_accuracy"], trained)
    assert abs(first["eval_loss"] - sst2_run["best_metrics"]["eval_loss"]) < 1e-3
    evaluate_checkpoint(cfg, sst2_run["best_checkpoint"], str(sst2_dir), "validation",
                        output=str(tmp_path / "b"))
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("a", "b"))
    assert evaluation.without_timing(a) != {} and {k for k in a if a[k] != b[k]} <= {
        *evaluation.TIMING_KEYS, "files"}
    assert (tmp_path / "a" / "eval.md").read_text().startswith("# Evaluation of")


def test_evaluate_on_a_tiny_checkpoint_writes_both_files(ray_4_cpus, tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    synth = generate_synthetic_sentiment(200, seed=4)
    pq.write_table(synth.slice(0, 150), data / "train.parquet")
    pq.write_table(synth.slice(150, 50), data / "validation.parquet")
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data),
                 "--output", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["eval_count"] == 50 and report["data"]["rows"] == 50
    assert len(report["data"]["sha256"]) == 64 and len(report["checkpoint"]["sha256"]) == 64
    assert f"eval_accuracy {report['eval_accuracy']:.4f}" in out
    cm = report["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, cm)) == 50


def test_results_keep_input_order_across_blocks_and_actors(ray_4_cpus, tiny_checkpoint):
    """What the teacher-logit pass and evaluate rely on: row i's result is row i's, with 2
    actors finishing blocks in any order."""
    from distilray.batch.pipeline import (
        ModelSpec,
        blocks,
        infer,
        inference_columns,
        ordered_results,
    )

    cfg = load_config(None, ["predict.min_actors=2", "predict.max_actors=2", "predict.batch_size=16"])
    texts = generate_synthetic_sentiment(3000, seed=6).column("text").to_pylist()
    rows = inference_columns(0, texts, pa.array([None] * len(texts), pa.string()))
    spec = ModelSpec(str(tiny_checkpoint), max_length=64)
    order, logits = [], []
    for batch in ordered_results(infer(ray.data.from_arrow(blocks(rows, 200)), spec, cfg.predict)):
        order += batch.column("__row").to_pylist()
        logits += batch.column("logits").to_pylist()
    assert order == list(range(3000))
    reference = Predictor(str(tiny_checkpoint), max_length=64).logits(texts[::300])
    np.testing.assert_allclose(np.asarray(logits[::300]), reference, atol=1e-5)
