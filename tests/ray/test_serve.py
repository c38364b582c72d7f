"""`distilray serve` on a real local Ray Serve, loopback only, with bounded load loops.

Four applications are deployed once per module from one Serve config — built with
`emit_serve_config` and started with `serve run`, exactly as a RayService would get it:
`main` (tiny model, fast autoscaling), `locked` (bearer token, tiny request timeout),
`tight` (one slot and a two-request queue, to overload on purpose; one Classifier call per
request, `serve.coalesce=false`; default text limits and a small body limit) and `single`
(topology=single: one deployment that is HTTP front and model, on the ONNX Runtime backend).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from distilray.config import load_config
from distilray.serve.app import CLASSIFIER_NAME, INGRESS_NAME, emit_serve_config
from distilray.serve.predictor import Predictor
from tests.conftest import free_port, save_tiny_checkpoint

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a"
TIGHT_BODY_BYTES = 200_000
TEXTS = ["a charming and often affecting journey .", "bad", "unflinchingly bleak and desperate",
         "the plot was not boring at all , but the ending was utterly forgettable and the cast "
         "seemed tired of the whole thing by the second act .", "ok"]
LOAD_WORKERS = 6  # closed-loop clients of TEXTS: 30 texts, within one replica's batch of 32



def wait_until(predicate, timeout_s: float, every_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=15).status_code == 200
    except requests.RequestException:
        return False


def replica_names(app: str) -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{CLASSIFIER_NAME}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)}


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments[CLASSIFIER_NAME].replica_states
    return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))


class Load:
    """Closed-loop load from `workers` threads until stopped; records every status code."""

    def __init__(self, url: str, workers: int, body: dict, max_requests: int = 20_000):
        self.url, self.workers, self.body, self.max_requests = url, workers, body, max_requests
        self.codes: list[int] = []
        self.seconds: list[float] = []  # of every answer, in order
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(workers)

    def _worker(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set() and len(self.codes) < self.max_requests:
                t0 = time.monotonic()
                try:
                    r = session.post(f"{self.url}/v1/classify", json=self.body, timeout=30)
                    self.codes.append(r.status_code)
                except requests.RequestException as exc:
                    self.codes.append(-1)
                    self.errors.append(repr(exc))
                self.seconds.append(time.monotonic() - t0)

    def __enter__(self) -> Load:
        self.futures = [self.pool.submit(self._worker) for _ in range(self.workers)]
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=60)
        self.pool.shutdown()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve-tiny"), "tiny-test")


@pytest.fixture(scope="module")
def served(ray_4_cpus, tiny_checkpoint, tmp_path_factory):
    """Three apps from one `serve run` config; yields {name: base URL}; shuts Serve down after."""
    import ray
    from ray import serve

    port = free_port()
    base = [f"serve.port={port}", "serve.num_cpus=0.5", "serve.max_length=64",
            "serve.health_check_period_s=1"]
    # torch: compared with transformers.pipeline; `locked` keeps serve.backend's default, auto
    common = base + ["serve.backend=torch"]
    main = load_config(None, common + [
        "serve.app_name=main", "serve.route_prefix=/", "serve.max_texts=8",
        "serve.max_text_chars=300", "serve.min_replicas=1", "serve.max_replicas=2",
        "serve.target_ongoing_requests=2", "serve.max_ongoing_requests=16",
        "serve.upscale_delay_s=0.5", "serve.downscale_delay_s=2", "serve.metrics_interval_s=0.5",
        "serve.look_back_period_s=2", "serve.batch_wait_timeout_s=0.02",
        "serve.request_timeout_s=20"])
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    locked = load_config(None, base + [
        "serve.app_name=locked", "serve.route_prefix=/locked", f"serve.auth_token_file={token_file}",
        "serve.request_timeout_s=0.05", "serve.batch_wait_timeout_s=0.5",
        "serve.max_batch_size=64", "serve.max_replicas=1"])
    tight = load_config(None, common + [
        "serve.app_name=tight", "serve.route_prefix=/tight", "serve.max_replicas=1",
        "serve.target_ongoing_requests=1", "serve.max_ongoing_requests=2",
        "serve.max_queued_requests=2", "serve.batch_wait_timeout_s=0.3", "serve.retry_after_s=2",
        "serve.coalesce=false",
        f"serve.max_request_bytes={TIGHT_BODY_BYTES}"])
    single = load_config(None, common + [
        "serve.app_name=single", "serve.route_prefix=/single", "serve.topology=single",
        "serve.max_replicas=1", "serve.max_texts=8", "serve.max_text_chars=300",
        "serve.backend=onnx"])
    config = emit_serve_config(main, str(tiny_checkpoint))
    for other in (locked, tight, single):
        config["applications"] += emit_serve_config(other, str(tiny_checkpoint))["applications"]
    path = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.run([str(serve_bin), "run", "--non-blocking", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    urls = {"main": f"http://127.0.0.1:{port}", "locked": f"http://127.0.0.1:{port}/locked",
            "tight": f"http://127.0.0.1:{port}/tight", "single": f"http://127.0.0.1:{port}/single",
            "port": port}
    for name in ("main", "locked", "tight", "single"):
        # ~20 s on two idle cores; minutes when the machine is shared and loaded
        wait_until(lambda n=name: ready(urls[n]), 600, what=f"{name} /readyz")
    yield urls
    serve.shutdown()


# --------------------------------------------------------------------------- behaviour


def test_predictions_match_in_process_and_transformers_pipeline(served, tiny_checkpoint):
    from transformers import pipeline

    url = served["main"]
    r = requests.post(f"{url}/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["checkpoint"].startswith("tiny-test@step1:")
    http = [[p["probabilities"]["negative"], p["probabilities"]["positive"]]
            for p in body["predictions"]]
    singles = [requests.post(f"{url}/v1/classify", json={"text": t}, timeout=30).json()
               ["predictions"][0]["probabilities"]["positive"] for t in TEXTS]
    np.testing.assert_allclose([p[1] for p in http], singles, atol=1e-5)

    local = Predictor(str(tiny_checkpoint), max_length=64).predict(TEXTS)
    np.testing.assert_allclose(http, [[p.probabilities["negative"], p.probabilities["positive"]]
                                      for p in local], atol=1e-5)
    pipe = pipeline("text-classification", model=str(tiny_checkpoint), top_k=None,
                    truncation=True, max_length=64, device="cpu")
    for pred, ref in zip(body["predictions"], pipe(TEXTS), strict=True):
        ref = {d["label"]: d["score"] for d in ref}
        assert pred["label"] == max(ref, key=ref.get)
        assert pred["probabilities"] == pytest.approx(ref, abs=1e-5)


def test_the_default_backend_on_cpu_is_onnx_int8(served):
    # `locked` leaves serve.backend at its default, auto (its classify calls all time out by
    # design; test_serve_overload and test_fresh_env classify over HTTP with the default)
    model = requests.get(f"{served['locked']}/v1/model", timeout=30,
                         headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert model["backend"] == "onnx-int8" and model["device"] == "cpu", model
    assert requests.get(f"{served['main']}/v1/model", timeout=30).json()["backend"] == "torch"


def test_single_topology_serves_from_one_deployment(served, tiny_checkpoint):
    from ray import serve

    url = served["single"]
    assert set(serve.status().applications["single"].deployments) == {INGRESS_NAME}
    r = requests.post(f"{url}/v1/classify", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny" and body["checkpoint"].startswith("tiny-test@step1:")
    assert requests.get(f"{url}/v1/model", timeout=30).json()["backend"] == "onnx"
    local = Predictor(str(tiny_checkpoint), max_length=64).predict(TEXTS)  # torch fp32
    np.testing.assert_allclose([p["probabilities"]["positive"] for p in body["predictions"]],
                               [p.probabilities["positive"] for p in local], atol=1e-5)
    bad = requests.post(f"{url}/v1/classify", json={"texts": ["x"] * 9}, timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"][0]["limit"] == 8
    ready_body = requests.get(f"{url}/readyz", timeout=30).json()
    assert ready_body["status"] == "ready" and ready_body["warmup_ms"] > 0
    with ThreadPoolExecutor(16) as pool:  # concurrent requests share forward passes in-process
        codes = list(pool.map(lambda t: requests.post(f"{url}/v1/classify", json={"text": t},
                                                      timeout=30).status_code, TEXTS * 12))
    assert codes == [200] * len(codes)


@pytest.mark.parametrize("payload, status, field, limit", [
    ({"text": ""}, 422, "text", None),
    ({"text": "   "}, 422, "text", None),
    ({"text": 42}, 422, "text", None),
    ({"texts": ["ok", ["nested"]]}, 422, "texts[1]", None),
    ({"texts": ["x"] * 9}, 422, "texts", 8),
    ({"texts": []}, 422, "texts", None),
    ({"text": "y" * 301}, 422, "text", 300),
    ({"text": "a", "extra": 1}, 422, "extra", None),
    ({"text": "a", "texts": ["b"]}, 422, "body", None),
    ("{not json", 400, "body", None),
])
def test_invalid_requests_get_documented_4xx(served, payload, status, field, limit):
    kwargs = ({"data": payload, "headers": {"Content-Type": "application/json"}}
              if isinstance(payload, str) else {"json": payload})
    r = requests.post(f"{served['main']}/v1/classify", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["detail"][0]["field"] == field
    assert body["detail"][0]["limit"] == limit
    if limit:
        assert str(limit) in body["message"]


def test_health_docs_and_openapi(served):
    url = served["main"]
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    ready_body = requests.get(f"{url}/readyz", timeout=10).json()
    assert ready_body["status"] == "ready" and ready_body["warmup_ms"] > 0
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
    schema = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/healthz", "/readyz"} <= set(schema["paths"])
    texts_schema = schema["components"]["schemas"]["TextsRequest"]["properties"]["texts"]
    assert texts_schema["maxItems"] == 8


def test_serve_runs_in_rays_high_throughput_mode(served):
    """The local Ray that distilray starts runs Serve behind HAProxy (RAY_SERVE_ENABLE_HA_PROXY)."""
    import psutil

    listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == served["port"]}
    names = {psutil.Process(pid).name() for pid in listeners if pid}
    assert names == {"haproxy"}, f"port {served['port']} is served by {names or 'nothing visible'}"
    assert requests.post(f"{served['main']}/v1/classify", json={"text": "fine"},
                         timeout=30).status_code == 200
    # so each Ingress replica runs its own HTTP server, and Serve wraps it in the middlewares
    # of the proxy callback named in the replica's environment: distilray's admission gate,
    # through the runtime_env of the emitted config
    from distilray.serve.app import PROXY_CALLBACK_ENV
    from distilray.serve.http import FRONT_MIDDLEWARES

    for app in ("main", "single"):
        fronts = [p for p in psutil.process_iter(["cmdline"])
                  if any(f"ServeReplica:{app}:Ingress" in part for part in p.info["cmdline"] or [])]
        assert fronts, f"no {app} Ingress replica process"
        for front in fronts:
            assert front.environ().get(PROXY_CALLBACK_ENV) == FRONT_MIDDLEWARES, app


def test_ray_use_uvloop_0_in_an_actors_runtime_env_gives_it_asyncios_event_loop(ray_4_cpus):
    """What serve.ingress_event_loop=asyncio relies on: Ray reads RAY_USE_UVLOOP when it creates
    an async actor's event loop, in the actor's own process."""
    import ray

    @ray.remote(num_cpus=0)
    class LoopKind:
        async def module(self) -> str:
            import asyncio

            return type(asyncio.get_running_loop()).__module__

    default = LoopKind.remote()
    plain = LoopKind.options(runtime_env={"env_vars": {"RAY_USE_UVLOOP": "0"}}).remote()
    try:
        assert ray.get(default.module.remote(), timeout=120).startswith("uvloop")
        assert ray.get(plain.module.remote(), timeout=120).startswith("asyncio")
    finally:
        for actor in (default, plain):
            ray.kill(actor)


def fuzz_test(operation, mode, checks, ran: Counter):
    """A bounded Hypothesis test sending schema-generated cases to one operation."""
    from hypothesis import HealthCheck, Phase, given, settings

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        case.call_and_validate(checks=checks)
        ran[(operation.label, mode.value)] += 1

    return fuzz


def test_openapi_fuzz_finds_no_5xx_and_no_schema_violation(served):
    import schemathesis
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{served['main']}/openapi.json")
    common = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    ran = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, extra in ((GenerationMode.POSITIVE, positive_data_acceptance),
                            (GenerationMode.NEGATIVE, negative_data_rejection)):
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # our GETs take no input: there is no invalid request to generate
            # A v2 infer body's validity also depends on shape vs data length and on the
            # model name, which JSON Schema cannot say: schema-valid bodies may get a 400
            # naming the problem, but schema-invalid ones must be refused, and never a 5xx.
            checks = common if (mode is GenerationMode.POSITIVE and
                                operation.path.endswith("/infer")) else [*common, extra]
            fuzz_test(operation, mode, checks, ran)()
    assert ran[("POST /v1/classify", "positive")] >= 20, ran
    assert ran[("POST /v1/classify", "negative")] >= 20, ran
    assert ran[("POST /v2/models/{name}/infer", "positive")] >= 20, ran
    assert ran[("POST /v2/models/{name}/infer", "negative")] >= 20, ran


def test_open_inference_protocol_with_tritonclient(served):
    """The KServe v2 routes through the real Triton HTTP client: same answers as /v1/classify."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    url = served["tight"]
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tight") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("tight")
    assert meta["name"] == "tight" and meta["inputs"][0]["datatype"] == "BYTES"
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(64)]
    v1 = requests.post(f"{url}/v1/classify", json={"texts": texts}, timeout=60).json()
    for binary in (True, False):  # the binary tensor extension (the client's default) and JSON
        tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
        result = client.infer("tight", [tensor], request_id="r1")
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        probs = result.as_numpy("probabilities")
        assert probs.shape == (64, 2) and probs.dtype == np.float32
        assert labels == [p["label"] for p in v1["predictions"]]
        np.testing.assert_allclose(probs, [[p["probabilities"]["negative"],
                                            p["probabilities"]["positive"]]
                                           for p in v1["predictions"]], atol=1e-6)
        assert result.get_response()["id"] == "r1"
    for model, data, words in (("tight", ["   "], "only whitespace"),
                               ("nope", ["fine"], "not served here"),
                               ("tight", ["x"] * 65, "limit 64")):
        tensor = httpclient.InferInput("text", [len(data)], "BYTES")
        tensor.set_data_from_numpy(np.array(data, dtype=object), binary_data=False)
        with pytest.raises(InferenceServerException, match=words) as err:
            client.infer(model, [tensor])
        assert err.value.status() in ("400", "404"), err.value.status()
    bad = requests.post(f"{url}/v2/models/tight/infer", timeout=30, json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]})
    assert bad.status_code == 400 and "1 elements but shape [2]" in bad.json()["error"]
    assert requests.post(f"{url}/v2/models/tight/infer", data="{oops", timeout=30).json() == {
        "error": "invalid inference request: the body is not valid JSON"}


def test_long_texts_are_truncated_and_big_bodies_get_413(served, tiny_checkpoint):
    """A 50,000-character text is classified on its first max_length tokens, like
    transformers.pipeline(truncation=True); a body over serve.max_request_bytes gets 413."""
    from transformers import pipeline

    url = served["tight"]
    long_text = ("the plot was not boring at all , but the ending was forgettable . " * 800)[:50_000]
    r = requests.post(f"{url}/v1/classify", json={"text": long_text}, timeout=60)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    pipe = pipeline("text-classification", model=str(tiny_checkpoint), top_k=None,
                    truncation=True, max_length=64, device="cpu")
    ref = {d["label"]: d["score"] for d in pipe([long_text])[0]}
    assert pred["label"] == max(ref, key=ref.get)
    assert pred["probabilities"] == pytest.approx(ref, abs=1e-5)
    big = {"texts": [long_text] * 5}  # 250 kB > TIGHT_BODY_BYTES
    for route, body in (("/v1/classify", big), ("/v2/models/tight/infer", {"inputs": [
            {"name": "text", "shape": [5], "datatype": "BYTES", "data": big["texts"]}]})):
        r = requests.post(f"{url}{route}", json=body, timeout=60)
        assert r.status_code == 413, (route, r.status_code, r.text[:200])
        message = r.json().get("message") or r.json()["error"]
        assert f"{TIGHT_BODY_BYTES} bytes (serve.max_request_bytes)" in message


def test_bearer_token_required_and_timeout_is_504(served):
    url = served["locked"]
    no_token = requests.post(f"{url}/v1/classify", json={"text": "hi"}, timeout=10)
    assert no_token.status_code == 401 and no_token.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(f"{url}/v1/classify", json={"text": "hi"}, timeout=10,
                          headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # probes stay open
    # authorised, but a batch waits 0.5 s and the request timeout is 0.05 s
    t0 = time.monotonic()
    slow = requests.post(f"{url}/v1/classify", json={"text": "hi"}, timeout=10,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert slow.status_code == 504, slow.text
    assert "request_timeout_s=0.05" in slow.json()["message"]
    assert time.monotonic() - t0 < 3


def test_proxy_timeout_header_gives_408(served):
    r = requests.post(f"{served['main']}/v1/classify", json={"text": "hi"}, timeout=10,
                      headers={"x-request-timeout-seconds": "0.001"})
    assert r.status_code == 408
    assert "timed out" in r.text


def test_overload_gets_fast_503_with_retry_after_then_recovers(served):
    url = served["tight"]

    def post(_):
        t0 = time.monotonic()
        try:
            r = requests.post(f"{url}/v1/classify", json={"text": "busy"}, timeout=30)
            return r.status_code, r.headers.get("Retry-After"), time.monotonic() - t0
        except requests.RequestException:
            return -1, None, time.monotonic() - t0

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(post, range(48)))
    codes = Counter(code for code, _, _ in results)
    assert set(codes) <= {200, 503}, codes
    assert codes[503] >= 10 and codes[200] >= 2, codes
    rejected = [(after, dt) for code, after, dt in results if code == 503]
    # serve.retry_after_s=2, or more while far more are refused than admitted (at most 10)
    assert all(after is not None and 2 <= int(after) <= 10 for after, _ in rejected), rejected
    assert np.median([dt for _, dt in rejected]) < 1.0  # rejected at once, not queued
    assert ready(url)
    ok = requests.post(f"{url}/v1/classify", json={"text": "calm again"}, timeout=30)
    assert ok.status_code == 200


def test_autoscales_up_under_load_and_back_down(served):
    url = served["main"]
    wait_until(lambda: running_replicas("main") == 1, 60, what="main at 1 replica")
    # 6 x 5 = 30 texts in flight: one replica's full batch (serve.max_batch_size, 32), which
    # serve.max_batches_ahead admits whole; the autoscaler wants 30 / 2 of them (max 2)
    with Load(url, workers=LOAD_WORKERS, body={"texts": TEXTS}) as load:
        wait_until(lambda: running_replicas("main") >= 2, 300, what="scale-up to 2 replicas")
    codes = Counter(load.codes)
    assert set(codes) == {200}, codes
    wait_until(lambda: running_replicas("main") == 1, 120, what="scale-down to 1 replica")


def test_killing_a_replica_under_load_loses_no_requests(served):
    import ray

    url = served["main"]
    with Load(url, workers=LOAD_WORKERS, body={"texts": TEXTS}) as load:
        wait_until(lambda: running_replicas("main") >= 2 and len(replica_names("main")) >= 2,
                   300, what="2 replicas under load")
        victim = sorted(replica_names("main"))[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = len(load.codes)
        time.sleep(6)
    codes = Counter(load.codes)
    assert len(load.codes) - killed_at >= 20, "load did not continue after the kill"
    ok = codes[200] / len(load.codes)
    assert ok >= 0.99, codes
    assert all(c in (200, 503) for c in codes), (codes, load.errors)
    # with two replicas the requests move to the live one at once: no wait for the replacement
    after_kill = load.seconds[killed_at:]
    assert float(np.percentile(after_kill, 99)) < 2.0, sorted(after_kill)[-5:]
    wait_until(lambda: victim not in replica_names("main") and running_replicas("main") >= 1,
               300, what="replacement replica")
    assert ready(url)


def test_prometheus_metrics_are_exported(served):
    import ray

    url = served["main"]
    for _ in range(3):
        requests.post(f"{url}/v1/classify", json={"texts": TEXTS[:3]}, timeout=30)
    requests.post(f"{url}/v1/classify", json={"text": ""}, timeout=30)
    node = next(n for n in ray.nodes() if n["Alive"])
    metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def scrape():
        text = requests.get(metrics_url, timeout=10).text
        wanted = ['distilray_requests_total{', 'status="200"', 'status="422"',
                  "distilray_request_latency_ms_bucket", "distilray_batch_size_bucket",
                  "distilray_queue_length", "distilray_ingress_queue_length",
                  "ray_serve_num_http_requests"]
        return text if all(w in text for w in wanted) else None

    text = wait_until(scrape, 60, every_s=2, what="distilray metrics in Prometheus export")
    assert 'route="/v1/classify"' in text


def test_cli_predict_reads_args_and_file(served, tmp_path, capsys):
    from distilray.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("first review\n\nsecond review\n")
    assert main(["predict", "--url", served["main"], "--file", str(texts), "--batch-size", "1",
                 "an argument"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["an argument", "first review",
                                                       "second review"]
    assert all(line.split("\t")[0] in ("negative", "positive") for line in lines)
    assert main(["predict", "--url", served["locked"], "hi"]) == 2
    assert "401" in capsys.readouterr().err


def test_cli_serve_detach_then_stop(served, tiny_checkpoint):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "distilray", "serve", "--checkpoint", str(tiny_checkpoint),
           "--port", str(served["port"]), "--set", "serve.app_name=cli",
           "--set", "serve.route_prefix=/cli", "--set", "serve.num_cpus=0.5",
           "--set", "serve.max_replicas=1"]
    proc = subprocess.run(cmd + ["--detach"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    url = f"http://127.0.0.1:{served['port']}/cli"
    assert f"serving at {url}" in proc.stdout
    r = requests.post(f"{url}/v1/classify", json={"text": "still here"}, timeout=30)
    assert r.status_code == 200
    stop = subprocess.run(cmd[:4] + ["--stop", "--set", "serve.app_name=cli"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert stop.returncode == 0 and "stopped cli" in stop.stdout, stop.stderr[-2000:]
    wait_until(lambda: requests.post(f"{url}/v1/classify", json={"text": "x"},
                                     timeout=10).status_code == 404, 30, what="cli app gone")
