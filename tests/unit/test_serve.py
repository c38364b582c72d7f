"""Serve's pure parts without a cluster: request validation, batched inference, Serve config."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from distilray.checkpoints import check_servable
from distilray.config import load_config
from distilray.errors import CheckpointError, ConfigError, DistilrayError
from distilray.serve.app import (
    CLASSIFIER_NAME,
    IMPORT_PATH,
    INGRESS_NAME,
    INGRESS_NUM_CPUS,
    emit_serve_config,
    resolve_checkpoint,
    serve_config_from_args,
)
from distilray.serve.http import server_token
from distilray.serve.predictor import Predictor, plan_chunks
from distilray.serve.schema import describe_validation_errors, request_models

TEXTS = ["a charming and often affecting journey .", "bad", "unflinchingly bleak and desperate",
         "the plot was not boring at all , but the ending was utterly forgettable and the cast "
         "seemed tired of the whole thing by the second act ."]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    path = tmp_path_factory.mktemp("tiny-ckpt")
    source = resolve_model("tiny")
    load_classifier(source, ["negative", "positive"], seed=3).save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    (path / "distilray.json").write_text(json.dumps(
        {"run_name": "unit", "step": 7, "epoch": 1, "metrics": {"eval_accuracy": 0.5},
         "model_name": "tiny", "max_length": 64}))
    return path


def _errors(body, max_texts=4, max_chars=20):
    text_req, texts_req = request_models(max_texts, max_chars)
    try:
        TypeAdapter(text_req | texts_req).validate_python(body)
    except ValidationError as exc:
        return describe_validation_errors(exc.errors(), body, max_texts, max_chars)
    return None


@pytest.mark.parametrize("body, field, limit, words", [
    ({"text": ""}, "text", None, "empty"),
    ({"text": " \n\t"}, "text", None, "whitespace"),
    ({"text": "\u0085\u3000"}, "text", None, "whitespace"),
    ({"text": "ok \udfff"}, "text", None, "unicode"),
    ({"text": "x" * 21}, "text", 20, "longer than 20"),
    ({"text": 3}, "text", None, "must be a string"),
    ({"texts": []}, "texts", None, "at least one"),
    ({"texts": ["a"] * 5}, "texts", 4, "more than 4"),
    ({"texts": ["ok", None]}, "texts[1]", None, "must be a string"),
    ({"texts": "not a list"}, "texts", None, "list of strings"),
    ({"text": "a", "texts": ["b"]}, "body", None, "exactly one"),
    ({}, "body", None, "exactly one"),
    ([1, 2], "body", None, "exactly one"),
])
def test_invalid_bodies_name_the_field_and_limit(body, field, limit, words):
    status, err = _errors(body)
    assert status == 422
    assert err.detail[0].field == field
    assert err.detail[0].limit == limit
    assert words in err.message


def test_schema_pattern_accepts_exactly_what_the_validator_accepts():
    import re

    from distilray.serve.schema import NOT_ONLY_WHITESPACE

    for text in ["\u0085", "\u00a0", "\u2028 ", " \t\r\n\x0b\x0c", "x", "\x1c", "\u00a0x"]:
        assert (_errors({"text": text}) is None) == bool(re.search(NOT_ONLY_WHITESPACE, text))


def test_valid_bodies_pass_and_json_errors_are_400():
    assert _errors({"text": "fine"}) is None
    assert _errors({"texts": ["a", " b ", "x" * 20]}) is None
    status, err = describe_validation_errors([{"type": "json_invalid", "loc": ("body", 1)}],
                                             "{bad", 4, 20)
    assert status == 400 and err.error == "malformed_json"


def test_request_schema_carries_the_limits():
    text_req, texts_req = request_models(7, 99)
    schema = texts_req.model_json_schema()
    assert schema["properties"]["texts"]["maxItems"] == 7
    assert schema["additionalProperties"] is False
    assert text_req.model_json_schema()["properties"]["text"]["maxLength"] == 99


def test_predictor_batches_match_single_texts_and_plain_forward(tiny_checkpoint):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pred = Predictor(str(tiny_checkpoint), max_length=64, max_batch_tokens=64)
    assert pred.labels == ["negative", "positive"]
    assert pred.info["id"].startswith("unit@step7:")
    batched = pred.logits(TEXTS)
    single = np.concatenate([pred.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, single, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        ref = np.concatenate([model(**tok(t, truncation=True, max_length=64,
                                          return_tensors="pt")).logits.numpy() for t in TEXTS])
    np.testing.assert_allclose(batched, ref, atol=1e-5)

    out = pred.predict(TEXTS)
    for p, row in zip(out, ref, strict=True):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert p.label == pred.labels[int(row.argmax())]
        assert p.score == pytest.approx(float(probs.max()), abs=1e-6)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert pred.predict([]) == []


def test_chunks_sort_by_length_and_respect_the_token_budget(tiny_checkpoint):
    pred = Predictor(str(tiny_checkpoint), max_length=64, max_batch_tokens=32)
    lengths = [30, 3, 9, 17, 5, 64, 8]
    chunks = pred.chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)
    for c in chunks:
        width = -(-max(lengths[i] for i in c) // 8) * 8
        assert len(c) == 1 or len(c) * width <= 32


def _pass_cost(lengths, chunk, overhead):
    return len(chunk) * -(-max(max(lengths[i], 1) for i in chunk) // 8) * 8 + overhead


def test_plan_chunks_is_the_cheapest_split_of_the_sorted_rows():
    """Against brute force: every split of the sorted rows into contiguous passes."""
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 70) for _ in range(rng.randint(1, 8))]
        overhead, budget = rng.choice([0, 8, 32, 200]), rng.choice([16, 64, 256, 8192])
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = math.inf
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            chunks, cur = [], [order[0]]
            for cut, i in zip(cuts, order[1:], strict=True):
                if cut:
                    chunks.append(cur)
                    cur = []
                cur.append(i)
            chunks.append(cur)
            if all(len(c) == 1 or _pass_cost(lengths, c, 0) <= budget for c in chunks):
                best = min(best, sum(_pass_cost(lengths, c, overhead) for c in chunks))
        plan = plan_chunks(lengths, budget, overhead, max_length=128)
        assert sorted(i for c in plan for i in c) == list(range(len(lengths)))
        assert [lengths[i] for c in plan for i in c] == sorted(lengths)
        assert all(len(c) == 1 or _pass_cost(lengths, c, 0) <= budget for c in plan)
        assert sum(_pass_cost(lengths, c, overhead) for c in plan) == best, (lengths, plan)


def test_plan_chunks_splits_short_from_long_texts_only_when_it_pays():
    lengths = [5] * 24 + [60] * 8  # one pass would pad 24 short texts to 64
    assert len(plan_chunks(lengths, 8192, 32, max_length=128)) == 2
    assert plan_chunks(lengths, 8192, 8192, max_length=128) == [sorted(range(32), key=lambda i: lengths[i])]
    assert len(plan_chunks([20] * 32, 8192, 32, max_length=128)) == 1  # equal lengths: nothing to save


def test_predictor_plans_passes_by_device(tiny_checkpoint):
    assert Predictor(str(tiny_checkpoint), max_length=64).pass_overhead_tokens == 64
    assert Predictor(str(tiny_checkpoint), max_length=64,
                     pass_overhead_tokens=0).pass_overhead_tokens == 0


def test_int8_backend_stays_close_to_fp32(tiny_checkpoint):
    fp32 = Predictor(str(tiny_checkpoint), max_length=64)
    int8 = Predictor(str(tiny_checkpoint), max_length=64, backend="int8")
    assert "DynamicQuantizedLinear" in repr(int8.model)
    a, b = fp32.logits(TEXTS), int8.logits(TEXTS)
    assert np.abs(a - b).max() < 0.05


def test_auto_backend_is_onnx_int8_on_cpu_when_onnx_runtime_is_installed(tiny_checkpoint, monkeypatch):
    import importlib.util

    from distilray.serve.predictor import resolve_backend

    assert load_config(None).serve.backend == "auto"
    assert load_config(None).predict.backend == "torch"  # batch scoring keeps fp32 answers
    assert importlib.util.find_spec("onnxruntime") is not None  # the dev extra installs it
    pred = Predictor(str(tiny_checkpoint), max_length=64, backend="auto")
    assert pred.backend == "onnx-int8" and pred.model is None
    fp32 = Predictor(str(tiny_checkpoint), max_length=64).logits(TEXTS)
    assert np.abs(pred.logits(TEXTS) - fp32).max() < 0.05
    assert resolve_backend("auto", "cuda") == "torch"  # GPUs run torch (and half precision)
    assert resolve_backend("auto", "cpu", "bfloat16") == "torch"
    assert resolve_backend("onnx", "cpu") == "onnx"  # a named backend is never replaced
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # a machine without the [onnx] extra
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    assert resolve_backend("auto", "cpu") == "torch"


def test_checkpoint_errors_name_the_problem(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no such directory"):
        check_servable(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no config.json"):
        check_servable(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        check_servable(str(tmp_path))
    exp = tmp_path / "exp"
    exp.mkdir()
    with pytest.raises(CheckpointError, match="no best/"):
        resolve_checkpoint(experiment=str(exp))
    (exp / "best").mkdir()
    assert resolve_checkpoint(experiment=str(exp)) == str(exp / "best")
    with pytest.raises(ConfigError, match="--checkpoint"):
        resolve_checkpoint()
    with pytest.raises(ConfigError, match="not both"):
        resolve_checkpoint("a", "b")
    assert check_servable(str(tiny_checkpoint)) == tiny_checkpoint.resolve()


def test_token_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DR_TEST_TOKEN", raising=False)
    assert server_token("DR_TEST_TOKEN", None) is None
    monkeypatch.setenv("DR_TEST_TOKEN", " s3cret\n")
    assert server_token("DR_TEST_TOKEN", None) == "s3cret"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert server_token("DR_TEST_TOKEN", str(f)) == "from-file"
    with pytest.raises(ConfigError, match="auth_token_file"):
        server_token("DR_TEST_TOKEN", str(tmp_path / "nope"))


def test_emitted_config_is_a_valid_serve_config_and_round_trips():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config("configs/serve.yaml", ["serve.max_replicas=3", "serve.num_gpus=1",
                                             "serve.host=0.0.0.0"])
    emitted = emit_serve_config(cfg, "/models/best")
    text = yaml.safe_dump(emitted, sort_keys=False)
    assert "&id" not in text  # no YAML aliases: the text is pasted into RayService manifests
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app = schema.applications[0]
    assert app.import_path == IMPORT_PATH == "distilray.serve:build_app"
    assert app.route_prefix == cfg.serve.route_prefix
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {INGRESS_NAME, CLASSIFIER_NAME}
    clf = deployments[CLASSIFIER_NAME]
    assert clf.autoscaling_config["max_replicas"] == 3
    assert clf.ray_actor_options.num_gpus == 1
    assert clf.max_ongoing_requests > clf.autoscaling_config["target_ongoing_requests"]
    assert schema.http_options.host == "0.0.0.0"
    checkpoint, serve_cfg = serve_config_from_args(app.args)
    assert checkpoint == "/models/best"
    assert serve_cfg.max_texts == cfg.serve.max_texts


def test_a_private_local_ray_is_sized_to_hold_every_replica_of_the_defaults():
    from distilray.cluster import local_head_node
    from distilray.runtime import local_cpus
    from distilray.serve.app import full_scale_cpus

    # defaults: (2 max replicas + 1 surge) x 1-CPU Classifier + (1 + 1 surge) x 0.1-CPU Ingress
    default = load_config(None).serve
    assert full_scale_cpus(default) == pytest.approx(3.2)
    assert local_cpus(full_scale_cpus(default)) >= 4  # `distilray serve` in the foreground
    head = local_head_node(full_scale_cpus(default))  # the head `distilray serve --detach` starts
    assert head.num_cpus == max(float(os.cpu_count() or 1), 4.0)
    # on 2 cores the old 2-CPU instance held one Classifier: one torch thread, one idle core
    assert 2 * default.num_cpus + INGRESS_NUM_CPUS > 2
    assert full_scale_cpus(load_config(None, ["serve.max_surge_percent=0"]).serve) == pytest.approx(2.1)
    assert full_scale_cpus(load_config(None, ["serve.topology=single"]).serve) == pytest.approx(3.0)
    assert full_scale_cpus(load_config(None, ["serve.max_replicas=4", "serve.num_cpus=2",
                                              "serve.ingress_replicas=2"]).serve) == pytest.approx(10.3)
    assert local_head_node(0.5).num_cpus == float(os.cpu_count() or 1)  # never below the machine


def test_version_changes_surge_by_default_and_the_surge_is_sized_per_deployment():
    from ray.serve.schema import ServeDeploySchema

    from distilray.serve.app import surge_resources

    cfg = load_config("configs/serve.yaml", ["serve.num_cpus=2", "serve.num_gpus=0.5"])
    app = ServeDeploySchema.model_validate(emit_serve_config(cfg, "/models/best")).applications[0]
    assert {d.name: d.max_surge_percent for d in app.deployments} == {INGRESS_NAME: 25, CLASSIFIER_NAME: 25}
    # 25% of one replica rounds up to one; of five, to two
    assert surge_resources(cfg.serve, {CLASSIFIER_NAME: 1, INGRESS_NAME: 1}) == {
        "CPU": pytest.approx(2.1), "GPU": pytest.approx(0.5)}
    assert surge_resources(cfg.serve, {CLASSIFIER_NAME: 5, INGRESS_NAME: 1}) == {
        "CPU": pytest.approx(4.1), "GPU": pytest.approx(1.0)}
    off = load_config("configs/serve.yaml", ["serve.max_surge_percent=0"])
    assert surge_resources(off.serve, {CLASSIFIER_NAME: 3}) == {"CPU": 0.0, "GPU": 0.0}
    app = ServeDeploySchema.model_validate(emit_serve_config(off, "/models/best")).applications[0]
    assert {d.max_surge_percent for d in app.deployments} == {0}
    with pytest.raises(ConfigError, match="max_surge_percent"):
        load_config("configs/serve.yaml", ["serve.max_surge_percent=101"])


def test_single_topology_config_has_one_deployment_holding_the_model():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config("configs/serve.yaml", ["serve.topology=single", "serve.max_replicas=3",
                                             "serve.num_cpus=2"])
    emitted = yaml.safe_load(yaml.safe_dump(emit_serve_config(cfg, "/models/best"), sort_keys=False))
    app = ServeDeploySchema.model_validate(emitted).applications[0]
    (only,) = app.deployments
    assert only.name == INGRESS_NAME  # the FastAPI ingress class, which now loads the model
    assert only.autoscaling_config["max_replicas"] == 3
    assert only.ray_actor_options.num_cpus == 2
    assert only.max_ongoing_requests > only.autoscaling_config["target_ongoing_requests"]
    _, serve_cfg = serve_config_from_args(app.args)  # what build_app binds: the same topology
    assert serve_cfg.topology == "single"


def test_the_http_front_gets_the_admission_gate_and_its_event_loop_through_its_runtime_env():
    from ray.serve.schema import ServeDeploySchema

    from distilray.serve.http import FRONT_MIDDLEWARES

    def front_env(*overrides):
        cfg = load_config("configs/serve.yaml", list(overrides))
        app = ServeDeploySchema.model_validate(emit_serve_config(cfg, "/m")).applications[0]
        deployments = {d.name: d for d in app.deployments}
        if CLASSIFIER_NAME in deployments:  # the model replicas serve no HTTP: Ray's defaults
            assert not deployments[CLASSIFIER_NAME].ray_actor_options.runtime_env
        env = deployments[INGRESS_NAME].ray_actor_options.runtime_env
        return (env or {}).get("env_vars")

    gate = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": FRONT_MIDDLEWARES}
    assert front_env() == gate  # uvloop stays: Ray's default
    assert front_env("serve.topology=single") == gate
    assert front_env("serve.ingress_event_loop=asyncio") == {**gate, "RAY_USE_UVLOOP": "0"}
    assert front_env("serve.http_fast_path=false") is None
    module, _, name = FRONT_MIDDLEWARES.partition(":")
    from importlib import import_module

    (middleware,) = getattr(import_module(module), name)()  # what Serve calls in the replica
    from distilray.serve.http import AdmissionGate

    assert middleware.cls is AdmissionGate


def test_build_app_rejects_bad_args_with_config_errors():
    with pytest.raises(ConfigError, match="checkpoint"):
        serve_config_from_args({})
    with pytest.raises(ConfigError, match="unknown Serve application args"):
        serve_config_from_args({"checkpoint": "/x", "replicas": 2})
    with pytest.raises(ConfigError, match="serve.max_texts"):
        serve_config_from_args({"checkpoint": "/x", "serve": {"max_texts": 0}})


def test_shipped_serve_preset_loads_with_sane_capacity():
    s = load_config("configs/serve.yaml").serve
    assert s.host == "127.0.0.1"  # loopback unless asked: Serve's port has no Ray token auth
    assert s.max_ongoing_requests > s.target_ongoing_requests
    assert s.max_batch_size <= s.max_texts


def test_client_reads_texts_from_args_and_file(tmp_path):
    from distilray.client import read_texts

    f = tmp_path / "texts.txt"
    f.write_text("first line\n\n  second line  \n")
    assert read_texts(["cli text", "  "], str(f)) == ["cli text", "first line", "second line"]
    with pytest.raises(DistilrayError, match="no texts"):
        read_texts([], None)
    with pytest.raises(DistilrayError, match="cannot read"):
        read_texts([], str(tmp_path / "missing.txt"))


def test_batcher_merges_everything_queued_during_a_forward_pass():
    import asyncio
    import threading
    import time

    from distilray.serve.batching import TextBatcher

    sizes: list[int] = []
    release = threading.Event()

    def run(texts):
        sizes.append(len(texts))
        if len(sizes) == 1:
            release.wait(5)  # hold the first pass while 20 more requests queue up
        return [t.upper() for t in texts]

    async def main():
        batcher = TextBatcher(run, max_batch_size=16, on_batch=lambda n: None)
        first = asyncio.create_task(batcher.submit(["a"]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit([f"t{i}", f"u{i}"])) for i in range(10)]
        await asyncio.sleep(0.05)
        release.set()
        t0 = time.perf_counter()
        results = await asyncio.gather(first, *rest)
        lone = await batcher.submit(["solo"])  # model idle, wait_s=0: runs at once
        return results, lone, time.perf_counter() - t0

    results, lone, _ = asyncio.run(main())
    assert sizes == [1, 16, 4, 1]  # 20 queued texts → one full batch of 16, then the rest
    assert results[0] == ["A"] and results[3] == ["T2", "U2"]
    assert lone == ["SOLO"]


def test_batcher_propagates_errors_and_skips_cancelled_requests():
    import asyncio

    from distilray.serve.batching import TextBatcher

    seen: list[list[str]] = []

    def run(texts):
        seen.append(list(texts))
        if "boom" in texts:
            raise ValueError("forward failed")
        return texts

    async def main():
        batcher = TextBatcher(run, max_batch_size=8, wait_s=0.05)
        doomed = asyncio.create_task(batcher.submit(["cancel-me"]))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(ValueError, match="forward failed"):
            await batcher.submit(["boom", "x"])
        return await batcher.submit(["fine"])

    assert asyncio.run(main()) == ["fine"]
    assert ["cancel-me"] not in seen and seen[0] == ["boom", "x"]


def test_batcher_runs_every_forward_on_the_given_executor_thread():
    """The Classifier keeps all torch work on one thread (benchmarks/serve_threads.py)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from distilray.serve.batching import TextBatcher

    threads: set[str] = set()

    def run(texts):
        threads.add(threading.current_thread().name)
        return texts

    async def main():
        batcher = TextBatcher(run, max_batch_size=2, executor=pool)
        return await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(9)))

    with ThreadPoolExecutor(1, thread_name_prefix="torch-work") as pool:
        loading_thread = pool.submit(lambda: threading.current_thread().name).result()
        results = asyncio.run(main())
    assert results == [[f"t{i}"] for i in range(9)]
    assert threads == {loading_thread} and loading_thread.startswith("torch-work")


def test_coalescer_merges_requests_that_wait_for_a_busy_replica():
    import asyncio

    from distilray.serve.batching import CallCoalescer

    calls: list[list[str]] = []
    gates: list[asyncio.Event] = []

    async def call(texts):
        calls.append(list(texts))
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return "replica-1", [t.upper() for t in texts]

    async def main():
        co = CallCoalescer(call, max_batch_size=4)
        first = asyncio.create_task(co.submit(["a"]))  # a free slot: leaves at once
        await asyncio.sleep(0)
        rest = [asyncio.create_task(co.submit([f"t{i}"])) for i in range(6)]
        doomed = asyncio.create_task(co.submit(["gone"]))
        await asyncio.sleep(0)
        doomed.cancel()  # timed out while waiting: never sent
        await asyncio.sleep(0)
        assert calls == [["a"]]  # one slot (one replica known): the rest wait
        gates[0].set()
        assert await first == ["A"]
        await asyncio.sleep(0)
        assert calls[1] == ["t0", "t1", "t2", "t3"]  # merged, up to max_batch_size
        for _ in range(2):
            gates[-1].set()
            await asyncio.sleep(0.01)
        return await asyncio.gather(*rest)

    results = asyncio.run(main())
    assert results == [[f"T{i}"] for i in range(6)]
    assert calls == [["a"], ["t0", "t1", "t2", "t3"], ["t4", "t5"]]


def test_coalescer_sends_a_replicas_share_per_call_once_two_replicas_answered():
    import asyncio

    from distilray.serve.batching import CallCoalescer

    calls: list[list[str]] = []
    gates: list[asyncio.Event] = []
    sources = iter(["r1", "r2", "r1", "r2", "r1", "r2"])

    async def call(texts):
        calls.append(list(texts))
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return next(sources), texts

    async def main():
        co = CallCoalescer(call, max_batch_size=4)
        assert co.call_texts() == 4  # one replica known: a whole batch per call
        for text in ("a", "b"):  # answered by r1, then r2
            task = asyncio.create_task(co.submit([text]))
            await asyncio.sleep(0.01)
            gates[-1].set()
            await task
        assert co.slots == 2 and co.call_texts() == 2
        held = [asyncio.create_task(co.submit([t])) for t in ("x", "y")]  # both slots busy
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(co.submit([f"t{i}"])) for i in range(4)]
        await asyncio.sleep(0.01)
        assert len(calls) == 4  # a, b, x, y: the four texts wait
        gates[2].set()  # x answered: its slot takes a replica's share, not all four
        await asyncio.sleep(0.01)
        assert calls[4] == ["t0", "t1"]
        gates[3].set()  # y answered: the next slot takes the rest
        await asyncio.sleep(0.01)
        assert calls[5:] == [["t2", "t3"]], calls
        for gate in gates[4:]:
            gate.set()
        return await asyncio.gather(*held, *queued)

    assert asyncio.run(main()) == [["x"], ["y"], ["t0"], ["t1"], ["t2"], ["t3"]]


def test_coalescer_opens_a_slot_per_replica_seen_and_closes_it_when_gone():
    import asyncio

    from distilray.serve.batching import CallCoalescer

    now = [0.0]
    replicas = iter(["r1", "r2", "r1", "r2"])
    in_flight: list[int] = []

    async def call(texts):
        in_flight.append(co.in_flight)
        await asyncio.sleep(0.01)
        return next(replicas), texts

    co = CallCoalescer(call, max_batch_size=1, window_s=10.0, clock=lambda: now[0])

    async def burst():
        return await asyncio.gather(*(co.submit([f"t{i}"]) for i in range(3)))

    assert co.slots == 1
    asyncio.run(burst())  # answered by r1 then r2: two replicas known
    assert co.slots == 2 and max(in_flight) == 1
    now[0] = 11.0  # neither answered within the window (replicas removed): back to one slot
    assert co.slots == 1


def test_coalescer_fails_every_merged_request_with_the_calls_error():
    import asyncio

    from distilray.serve.batching import CallCoalescer

    async def call(texts):
        await asyncio.sleep(0.01)
        raise RuntimeError("replica lost")

    async def main():
        co = CallCoalescer(call, max_batch_size=8)
        results = await asyncio.gather(*(co.submit([f"t{i}"]) for i in range(4)),
                                       return_exceptions=True)
        assert co.in_flight == 0 and not co.pending
        return results

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_batcher_refuses_at_once_what_would_wait_over_the_time_budget():
    import asyncio
    import time

    from distilray.serve.batching import QueueFull, TextBatcher

    def run(texts):
        time.sleep(0.1)  # one forward pass: 0.1 s, whatever its size
        return [t.upper() for t in texts]

    async def main():
        batcher = TextBatcher(run, max_batch_size=2, max_wait_s=1.0, wait_passes=2.0)
        assert await batcher.submit(["warm"]) == ["WARM"]  # measures a pass
        assert abs(batcher.pass_s - 0.1) < 0.05
        t0 = time.monotonic()
        tasks = [asyncio.create_task(batcher.submit([f"t{i}"])) for i in range(12)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.monotonic() - t0, batcher.refused

    results, took, refused = asyncio.run(main())
    refusals = [r for r in results if isinstance(r, QueueFull)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert answered == [[f"T{i}"] for i in range(len(answered))]  # the first ones, in order
    # passes of two: t0-t5 start within 2 passes (0.2 s); t6-t11 would wait longer
    assert len(answered) == 6 and len(refusals) == 6 == refused, results
    assert all(not r.expired and r.wait_s > r.budget_s for r in refusals)
    budget = refusals[0].budget_s  # 2 passes as measured: 0.20 s, a little more on a busy host
    assert 0.19 <= budget < 0.3, budget
    assert f"over the queue's {budget:.2f}s budget" in str(refusals[0])
    assert took < 0.5  # three passes: nobody waited for the refused


def test_queue_bounded_by_texts_keeps_a_flood_to_full_load_sized_passes():
    import asyncio
    import time

    from distilray.serve.batching import CallCoalescer, QueueFull, TextBatcher

    sizes: list[int] = []

    def run(texts):
        sizes.append(len(texts))
        time.sleep(0.1)
        return texts

    async def call(texts):
        sizes.append(len(texts))
        await asyncio.sleep(0.1)
        return "replica-1", texts

    async def flood(queue):
        await queue.submit(["warm"])  # measures a pass
        full = asyncio.create_task(queue.submit(["a", "b", "c", "d"]))  # a full pass runs
        await asyncio.sleep(0.02)
        answers = await asyncio.gather(*(queue.submit([f"t{i}"]) for i in range(8)),
                                       return_exceptions=True)
        await full
        return answers

    for make in (lambda ahead: TextBatcher(run, 4, max_wait_s=1.0, batches_ahead=ahead),
                 lambda ahead: CallCoalescer(call, 4, max_wait_s=1.0, batches_ahead=ahead)):
        # the time bound alone: a request may wait one pass, so a full pass queues behind the
        # running one (a pass of 4 where the full-load pass, concurrency 4, has 1 to 3)
        sizes.clear()
        answers = asyncio.run(flood(make(None)))
        assert [a for a in answers if not isinstance(a, BaseException)] == [[f"t{i}"] for i in range(4)]
        assert sizes == [1, 4, 4], sizes
        # bounded by texts: 4 running fill the one batch allowed ahead; the first request
        # behind them goes (nothing waits yet), the rest are refused at once, naming the wait
        sizes.clear()
        answers = asyncio.run(flood(make(1.0)))
        assert answers[0] == ["t0"], answers
        refused = answers[1:]
        assert all(isinstance(r, QueueFull) and not r.expired and r.wait_s > r.budget_s
                   for r in refused), refused
        assert 0.09 <= refused[0].budget_s < 0.2, refused[0].budget_s  # one pass as measured
        assert sizes == [1, 4, 1], sizes


def test_texts_bound_is_never_below_one_full_batch():
    """Half a batch per replica (the default) would refuse concurrency `max_batch_size` on one
    replica; the bound is one full batch at least, so only what is over it is refused."""
    import asyncio
    import time

    from distilray.serve.batching import CallCoalescer, QueueFull, TextBatcher

    def run(texts):
        time.sleep(0.1)
        return texts

    async def call(texts):
        await asyncio.sleep(0.1)
        return "replica-1", texts

    async def fill(queue):
        await queue.submit(["warm"])  # measures a pass
        running = asyncio.create_task(queue.submit(["a", "b"]))  # 2 texts running
        await asyncio.sleep(0.02)
        admitted = asyncio.create_task(queue.submit(["c"]))  # 3 ahead of the next: < 4
        await asyncio.sleep(0)
        over = await asyncio.gather(queue.submit(["d"]), queue.submit(["e"]),
                                    return_exceptions=True)
        return await running, await admitted, over, queue.refused

    for queue in (TextBatcher(run, 4, max_wait_s=1.0, batches_ahead=0.5),
                  CallCoalescer(call, 4, max_wait_s=1.0, batches_ahead=0.5)):
        running, admitted, over, refused = asyncio.run(fill(queue))
        assert running == ["a", "b"] and admitted == ["c"]
        # 3 ahead: "d" still fits the one batch; then 4 ahead fill it and "e" is refused
        assert over[0] == ["d"], over
        assert isinstance(over[1], QueueFull) and not over[1].expired and refused == 1, over


def test_the_wait_before_the_read_counts_only_while_the_queue_is_refusing():
    import asyncio
    import time

    from distilray.serve.batching import CallCoalescer, QueueFull

    async def call(texts):
        await asyncio.sleep(0.1)
        return "replica-1", texts

    async def scenario():
        queue = CallCoalescer(call, 4, max_wait_s=1.0, batches_ahead=1.0)
        await queue.submit(["warm"])  # measures a call: the budget is one call, ~0.1 s
        running = asyncio.create_task(queue.submit(["a"]))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(queue.submit(["b"]))  # something waits: the bound applies
        await asyncio.sleep(0)
        calm = queue.refusal(waited_s=0.5)  # read 0.5 s late, nothing refused lately: admitted
        queue.admission.count(refused=1)  # a refusal: overloaded
        late = queue.refusal(waited_s=0.5)
        prompt = queue.refusal(waited_s=0.0)
        await asyncio.gather(running, queued)
        return calm, late, prompt

    t0 = time.monotonic()
    calm, late, prompt = asyncio.run(scenario())
    assert time.monotonic() - t0 < 2.0  # all within the AdmissionRate's window
    assert calm is None and prompt is None
    assert isinstance(late, QueueFull) and late.wait_s >= 0.5 > late.budget_s, late


def test_admission_gate_answers_a_refused_classify_before_the_app():
    import asyncio

    from fastapi.responses import JSONResponse

    from distilray.serve import http

    inner = _RecordingApp()
    gate = http.AdmissionGate(inner)
    checked: list[list] = []
    verdict: list = [None]

    def check(headers, waited_s):
        checked.append(headers)
        assert waited_s == 0.0  # no socket behind this `receive`
        return verdict[0]

    def call(method="POST", path="/split/v1/classify", on_other_loop=False):
        async def registered(scope, receive, send):  # the Ingress registers on its own loop
            loop = asyncio.new_event_loop() if on_other_loop else asyncio.get_running_loop()
            http.ADMISSION[:] = [(loop, check)]
            try:
                await gate(scope, receive, send)
            finally:
                http.ADMISSION.clear()
                if on_other_loop:
                    loop.close()

        sent, _ = _asgi_call(registered, method, path, [b'{"text": "hi"}'],
                             headers=[(b"content-length", b"14")])
        return sent

    verdict[0] = JSONResponse({"error": "overloaded"}, status_code=503, headers={"Retry-After": "2"})
    sent = call()
    assert sent[0]["status"] == 503 and (b"retry-after", b"2") in sent[0]["headers"]
    assert inner.bodies == []  # neither the app nor the body was touched
    assert checked == [[(b"content-length", b"14")]]
    verdict[0] = None  # admitted: the request goes on, body and all
    assert call()[0]["status"] == 422 and inner.bodies == [b'{"text": "hi"}']
    checked.clear()
    verdict[0] = JSONResponse({}, status_code=503)
    for kwargs in ({"method": "GET"}, {"path": "/split/v1/model"}, {"on_other_loop": True}):
        assert call(**kwargs)[0]["status"] == 422, kwargs  # not the gate's: the app answers
    assert checked == [] and len(inner.bodies) == 4


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_socket_wait_is_the_time_a_request_sat_in_the_kernel_before_uvicorn_read_it(loop):
    """A real uvicorn server on loopback, whose event loop is held for 0.3 s while a request
    arrives on a new connection (as when uvloop accepts one connection per iteration)."""
    import socket
    import threading
    import time

    import uvicorn

    from distilray.serve.http import socket_wait_s

    waits: list[float] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        waits.append(socket_wait_s(receive))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, loop=loop, lifespan="off", log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    request = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"

    def ask() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(request)
            return c.recv(1024)

    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ask().startswith(b"HTTP/1.1 204")  # read at once
        held = threading.Event()

        def hold():
            held.set()
            time.sleep(0.3)

        server.servers[0].get_loop().call_soon_threadsafe(hold)
        assert held.wait(5)
        assert ask().startswith(b"HTTP/1.1 204")  # sent while the loop was held
    finally:
        server.should_exit = True
        thread.join(10)
    assert waits[0] < 0.05, waits
    assert 0.2 <= waits[1] <= 0.6, waits


@pytest.mark.parametrize("headers,token,passes", [
    ([(b"content-length", b"20")], None, True),
    ([(b"content-length", b"20"), (b"content-type", b"application/json; charset=utf-8")], None, True),
    ([(b"content-length", b"20"), (b"authorization", b"Bearer s3cret")], "s3cret", True),
    ([(b"content-length", b"20")], "s3cret", False),  # the app answers 401
    ([(b"content-length", b"20"), (b"authorization", b"Bearer wrong")], "s3cret", False),
    ([(b"content-length", b"2000")], None, False),  # over the limit: the app answers 413
    ([], None, False),  # chunked: its size is known only once read
    ([(b"content-length", b"20"), (b"content-type", b"text/plain")], None, False),  # 422
])
def test_gate_answers_only_requests_the_app_would_not_refuse_for_another_reason(headers, token, passes):
    from distilray.serve.http import gate_passes

    assert gate_passes(headers, token, max_bytes=1000) is passes


def test_a_request_over_a_batch_is_admitted_once_and_answered_across_passes():
    import asyncio
    import time

    from distilray.serve.batching import CallCoalescer, QueueFull, TextBatcher

    sizes: list[int] = []

    async def call(texts):
        sizes.append(len(texts))
        await asyncio.sleep(0.05)
        return "replica-1", [t.upper() for t in texts]

    def run(texts):
        sizes.append(len(texts))
        time.sleep(0.05)
        return [t.upper() for t in texts]

    async def big_request(queue):
        await queue.submit(["warm"])  # measures a pass
        big = [f"a{i}" for i in range(10)]  # 10 texts, batch 4: passes of 4, 4 and 2
        answer = asyncio.ensure_future(queue.submit(big))
        await asyncio.sleep(0)
        behind = await asyncio.gather(queue.submit(["b"]), return_exceptions=True)
        return await answer, behind[0]

    for queue in (TextBatcher(run, 4, max_wait_s=1.0, batches_ahead=1.0),
                  CallCoalescer(call, 4, max_wait_s=1.0, batches_ahead=1.0)):
        sizes.clear()
        answer, behind = asyncio.run(big_request(queue))
        assert answer == [f"A{i}" for i in range(10)]
        assert sizes == [1, 4, 4, 2], sizes
        # its own later passes are not refused, but a request behind it is
        assert isinstance(behind, QueueFull) and not behind.expired, behind
        assert queue.queued_texts == 0 and not queue.pending and not queue.running


def test_texts_bound_counts_per_replica_with_two_calls_in_flight():
    import asyncio

    from distilray.serve.batching import CallCoalescer, QueueFull

    async def call(texts):
        await asyncio.sleep(0.1)
        return "replica-1", texts

    async def flood():
        queue = CallCoalescer(call, 4, max_wait_s=1.0, batches_ahead=1.0, calls_per_source=2)
        await queue.submit(["warm"])
        full = asyncio.create_task(queue.submit(["a", "b", "c", "d"]))
        await asyncio.sleep(0.02)
        answers = await asyncio.gather(*(queue.submit([f"t{i}"]) for i in range(6)),
                                       return_exceptions=True)
        await full
        return answers, queue.slots

    answers, slots = asyncio.run(flood())
    # two call slots, one replica: t0 takes the free slot, t1 waits for the next call, and
    # then 4 running + 1 queued fill the replica's one batch (not two: one per slot)
    assert slots == 2
    assert answers[:2] == [["t0"], ["t1"]], answers
    assert all(isinstance(r, QueueFull) for r in answers[2:]), answers


def test_queued_requests_past_max_wait_are_refused_then_the_queue_recovers():
    import asyncio
    import pickle
    import time

    from distilray.serve.batching import CallCoalescer, QueueFull, TextBatcher

    slow = [0.4]

    def run(texts):
        time.sleep(slow[0])
        return texts

    async def call(texts):
        await asyncio.sleep(slow[0])
        return "replica-1", texts

    async def scenario(queue):
        first = asyncio.create_task(queue.submit(["first"]))  # nothing measured yet: admitted
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        behind = await asyncio.gather(*(queue.submit([f"t{i}"]) for i in range(3)),
                                      return_exceptions=True)
        refused_after = time.monotonic() - t0
        assert await first == ["first"]
        slow[0] = 0.01
        return behind, refused_after, await queue.submit(["calm"])

    for queue in (lambda: TextBatcher(run, max_batch_size=1, max_wait_s=0.15),
                  lambda: CallCoalescer(call, max_batch_size=1, max_wait_s=0.15)):
        slow[0] = 0.4
        behind, refused_after, calm = asyncio.run(scenario(queue()))
        assert all(isinstance(r, QueueFull) and r.expired for r in behind), behind
        assert 0.1 < refused_after < 0.35  # at the budget, not after the 0.4 s pass
        assert calm == ["calm"]
    again = pickle.loads(pickle.dumps(behind[0]))  # crosses from a replica to the Ingress
    assert isinstance(again, QueueFull) and str(again) == str(behind[0])


def test_coalescer_sends_around_a_call_stalled_on_a_lost_replica():
    import asyncio
    import time

    from distilray.serve.batching import CallCoalescer

    lost = asyncio.Event()  # never set: the replica's node is gone, no answer comes

    async def call(texts):
        if texts == ["to-the-lost-replica"]:
            await lost.wait()
        await asyncio.sleep(0.02)
        return "live", texts

    async def main():
        co = CallCoalescer(call, max_batch_size=8)
        assert await co.submit(["warm"]) == ["warm"]  # one replica known, a pass measured
        stuck = asyncio.create_task(co.submit(["to-the-lost-replica"]))
        await asyncio.sleep(0)
        t0 = time.monotonic()
        behind = await asyncio.wait_for(co.submit(["behind"]), 2.0)
        waited = time.monotonic() - t0
        stuck.cancel()
        return behind, waited, co.in_flight

    behind, waited, in_flight = asyncio.run(main())
    assert behind == ["behind"]
    # left once the stuck call counted as stalled (STALL_MIN_S), not after an error
    assert 0.2 < waited < 0.6, waited
    assert in_flight == 1  # only the stalled call is left


def test_retry_after_grows_with_the_refused_to_admitted_ratio():
    from distilray.serve.batching import AdmissionRate

    now = [0.0]
    rate = AdmissionRate(1.0, cap_s=10.0, clock=lambda: now[0])
    assert rate.retry_after_s() == 1.0
    rate.count(admitted=50, refused=20)
    assert rate.retry_after_s() == 1.0  # fewer refused than admitted: the base
    rate.count(refused=230)
    assert rate.retry_after_s() == 5.0  # 250 refused for 50 admitted: spread them over 5 s
    rate.count(refused=5000)
    assert rate.retry_after_s() == 10.0  # capped
    now[0] = 1.5  # the counts move to the previous second, still counted
    assert rate.retry_after_s() == 10.0
    now[0] = 4.0  # two quiet seconds: back to the base
    assert rate.retry_after_s() == 1.0


def test_texts_in_flight_policy_scales_on_reported_texts():
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    from distilray.serve import texts_in_flight_policy
    from distilray.serve.schema import TEXTS_IN_FLIGHT

    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8)

    def ctx(metrics, requests=0.0):
        return SimpleNamespace(aggregated_metrics=metrics, total_num_requests=requests,
                               config=config)

    assert texts_in_flight_policy(ctx({TEXTS_IN_FLIGHT: {"r1": 20.0, "r2": 12.0}}))[0] == 4.0
    assert texts_in_flight_policy(ctx({TEXTS_IN_FLIGHT: {"r1": 2.0}}))[0] == 0.25
    # no report yet (cold start): calls queued at the Ingress's handle
    assert texts_in_flight_policy(ctx({}, requests=8.0))[0] == 1.0


def test_coalescing_split_config_uses_the_texts_policy():
    from ray.serve.schema import ServeDeploySchema

    from distilray.serve.app import TEXTS_POLICY_PATH

    for overrides, policy in (([], TEXTS_POLICY_PATH), (["serve.coalesce=false"], None)):
        cfg = load_config("configs/serve.yaml", overrides)
        app = ServeDeploySchema.model_validate(
            emit_serve_config(cfg, "/models/best")).applications[0]
        clf = {d.name: d for d in app.deployments}[CLASSIFIER_NAME]
        assert clf.autoscaling_config.get("policy", {}).get("policy_function") == policy
        assert serve_config_from_args(app.args)[1].coalesce == (policy is not None)


def _asgi_call(app, method: str, path: str, body_chunks: list[bytes], headers=None,
               root_path: str = ""):
    """Drive an ASGI app by hand: returns (messages sent, scope)."""
    import asyncio

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path,
             "headers": headers if headers is not None else [(b"content-type", b"application/json")]}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(body_chunks) - 1}
                for i, c in enumerate(body_chunks)]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, scope


class _RecordingApp:
    """The FastAPI stand-in behind the fast path: records what reached it and its body."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await send({"type": "http.response.body", "body": b"from fastapi"})


def _fast_path(handler):
    import os

    from distilray.serve.http import FAST_CLASSIFY, ClassifyFastPath

    key = os.urandom(4).hex()
    FAST_CLASSIFY[key] = handler
    inner = _RecordingApp()
    return ClassifyFastPath(inner, key), inner


def test_fast_path_answers_valid_bodies_without_the_framework():
    from fastapi.responses import JSONResponse

    seen = []

    async def handler(body, headers):
        seen.append(body)
        return JSONResponse({"ok": True})

    app, inner = _fast_path(handler)
    sent, scope = _asgi_call(app, "POST", "/v1/classify", [b'{"te', b'xt": "hi"}'],
                             root_path="/split")
    assert seen == [b'{"text": "hi"}'] and inner.bodies == []
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"ok":true}'
    assert scope["route"].path == "/v1/classify"  # what StatusMetricsMiddleware labels it


def test_fast_path_replays_the_whole_body_into_fastapi_when_the_handler_declines():
    async def handler(body, headers):
        return None  # invalid body or missing token: FastAPI answers

    app, inner = _fast_path(handler)
    sent, _ = _asgi_call(app, "POST", "/v1/classify", [b'{"text": ', b'""}'])
    assert inner.bodies == [b'{"text": ""}']
    assert sent[0]["status"] == 422 and sent[1]["body"] == b"from fastapi"


@pytest.mark.parametrize("method,path,headers", [
    ("GET", "/v1/classify", None),
    ("POST", "/v1/model", None),
    ("POST", "/v1/classify", [(b"content-type", b"text/plain")]),  # FastAPI: not parsed as JSON
])
def test_fast_path_leaves_other_requests_to_fastapi(method, path, headers):
    async def handler(body, headers):
        raise AssertionError("the fast path must not see this request")

    app, inner = _fast_path(handler)
    _asgi_call(app, method, path, [b'{"text": "hi"}'], headers=headers)
    assert inner.bodies == [b'{"text": "hi"}']


def test_fast_path_handler_is_registered_from_a_class_pickled_by_value():
    """Serve pickles the per-config Ingress class by value, with a copy of the globals it
    names. Its behaviour must come from the module-level `Ingress`, pickled by reference, so
    that in a replica process the handler lands in the registry `ClassifyFastPath` reads."""
    import subprocess
    import sys
    import textwrap

    dump = textwrap.dedent('''
        import sys
        from ray import cloudpickle
        from distilray.config import ServeConfig
        from distilray.serve.deployments import ingress_class
        from distilray.serve.http import make_fastapi_app
        from distilray.serve.schema import request_models
        text_req, texts_req = request_models(4, 20)
        app = make_fastapi_app(ServeConfig())
        cls = ingress_class(app, text_req | texts_req)
        sys.stdout.buffer.write(cloudpickle.dumps((cls, app.state.fast_path_key)))
    ''')
    load = textwrap.dedent('''
        import sys
        from ray import cloudpickle
        cls, key = cloudpickle.loads(sys.stdin.buffer.read())  # a fresh process, as a replica
        import distilray.serve.deployments as d
        import distilray.serve.http as h
        routed = next(c for c in cls.__mro__ if "classify" in vars(c) and c is not d.Ingress)
        route = vars(routed)["classify"]
        assert route.__globals__ is not vars(d)  # the premise: the routes came by value
        assert routed.fast_path_key == key
        ours = next(c for c in cls.__mro__ if "_fast_classify" in vars(c))
        assert ours is d.Ingress  # the behaviour came by reference
        init = vars(ours)["__init__"]
        assert init.__globals__ is vars(d)  # so it sees the real module globals
        assert "FAST_CLASSIFY" in init.__code__.co_names
        assert init.__globals__["FAST_CLASSIFY"] is h.FAST_CLASSIFY  # what ClassifyFastPath reads
        handler = object()
        init.__globals__["FAST_CLASSIFY"][key] = handler
        assert h.FAST_CLASSIFY[key] is handler
        print("ok")
    ''')
    pickled = subprocess.run([sys.executable, "-c", dump], capture_output=True, timeout=120)
    assert pickled.returncode == 0, pickled.stderr.decode()[-2000:]
    out = subprocess.run([sys.executable, "-c", load], input=pickled.stdout, capture_output=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.decode().strip() == "ok", out.stderr.decode()[-2000:]


def test_two_calls_per_replica_keep_the_next_call_queued_in_the_replica():
    import asyncio

    from distilray.serve.batching import CallCoalescer

    now = [0.0]
    arrived: list[list[str]] = []
    gates: list[asyncio.Event] = []

    async def call(texts):
        arrived.append(list(texts))
        gate = asyncio.Event()
        gates.append(gate)
        if len(arrived) <= 3:
            await gate.wait()
        return "replica-1", texts

    async def main():
        co = CallCoalescer(call, max_batch_size=2, clock=lambda: now[0], max_wait_s=5.0,
                           calls_per_source=2)
        tasks = [asyncio.create_task(co.submit([f"t{i}"])) for i in range(5)]
        for _ in range(3):
            await asyncio.sleep(0)
        # one replica known, two calls in flight: the second leaves while the first runs
        assert arrived == [["t0"], ["t1"]] and co.slots == 2 and co.queued_texts == 3
        now[0] = 0.4  # the first call (one pass) took 0.4 s
        gates[0].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert arrived[2] == ["t2", "t3"]
        # the wait budget is a call's time (about two passes with two calls per replica)
        assert co.pass_s == 0.4 and co.budget_s() == 0.4
        for gate in gates[1:]:
            gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [[f"t{i}"] for i in range(5)]
    assert CallCoalescer(call, max_batch_size=2).slots == 1
