"""The two Serve deployments: `Classifier` (a model replica) and `Ingress` (the HTTP front).

Both are module-level classes, so Serve pickles them by reference and their methods see
this module's real globals (the fast-path registry included). Only the routes depend on
the config: `ingress_class(app, body_type)` subclasses `Ingress` with thin route methods on
the config's FastAPI app, and only `classify` carries the per-config body annotation.

No `from __future__ import annotations` here: FastAPI resolves the routes' parameters
(the request body model, `Request`) from real annotations.
"""

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import asdict, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.metrics import Counter, Gauge, Histogram

from distilray.config import ServeConfig
from distilray.serve import oip
from distilray.serve.batching import CallCoalescer, QueueFull, TextBatcher
from distilray.serve.http import (
    ADMISSION,
    CLASSIFY_PATH,
    FAST_CLASSIFY,
    bearer_matches,
    gate_passes,
    server_token,
)
from distilray.serve.predictor import Prediction, Predictor
from distilray.serve.schema import (
    ERROR_RESPONSES,
    TEXTS_IN_FLIGHT,
    ClassifyResponse,
    ErrorResponse,
    error_json,
)
from distilray.store import ModelStore

log = logging.getLogger(__name__)

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
UNAUTHORIZED = "send 'Authorization: Bearer <token>'"


class Classifier:
    """One model replica: a Predictor behind a continuous-batching queue of texts."""

    def __init__(self, checkpoint: str | None, settings: dict[str, Any],
                 bundle: dict[str, str] | None = None):
        import torch

        s = replace(ServeConfig(), **settings)
        self._version = f"{bundle['name']}@{bundle['version']}" if bundle else None
        if bundle:  # verified here, in the replica: a tampered or half-copied bundle never loads
            checkpoint = str(ModelStore(bundle["store"]).local_bundle(bundle["name"], bundle["version"]))
        assert checkpoint is not None
        threads = s.torch_threads or max(1, int(s.num_cpus))
        device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # All torch work (loading, warm-up, every forward pass) on one thread. Forward
        # passes on a pool thread after loading on another kept only ~1.6 of 2 cores busy
        # and ran 1.07-1.42x slower (benchmarks/serve_threads.py); the event loop stays free.
        self._torch_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="distilray-forward")

        def load() -> Predictor:
            torch.set_num_threads(threads)
            return Predictor(checkpoint, s.max_length, s.backend, s.max_batch_tokens,
                             device, pass_overhead_tokens=s.pass_overhead_tokens, dtype=s.dtype)

        self._predictor = self._torch_thread.submit(load).result()
        self._served = (self._predictor.info["id"], self._version)
        self._batch_size = Histogram("distilray_batch_size", "Texts per forward batch",
                                     boundaries=BATCH_BOUNDARIES)
        self._queue = Gauge("distilray_queue_length",
                            "Texts waiting for or in a forward pass on this replica")
        self._texts = Counter("distilray_texts", "Texts classified")
        # Behind a coalescing Ingress the bound by texts is the Ingress's: it counts this
        # replica's texts in both of its calls, and the second call waits here for the next pass.
        batches_ahead = None if s.coalesce and s.topology == "split" else s.max_batches_ahead
        self._batcher = TextBatcher(self._forward, s.max_batch_size, s.batch_wait_timeout_s,
                                    on_batch=self._batch_formed, executor=self._torch_thread,
                                    max_wait_s=s.max_queue_wait_s, wait_passes=s.queue_wait_passes,
                                    retry_after_s=s.retry_after_s, batches_ahead=batches_ahead)
        self._failures = 0
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        t0 = time.perf_counter()
        self._torch_thread.submit(self._predictor.predict, ["warm-up forward pass"]).result()
        self._warmup_ms = (time.perf_counter() - t0) * 1000
        log.info("Classifier replica ready: %s (%s, %s, %d threads), warm-up %.0f ms",
                 self._predictor.info["id"], device, s.backend, threads, self._warmup_ms)

    async def classify(self, texts: list[str]) -> list[tuple[Prediction, tuple[str, str | None]]]:
        """Each prediction with (checkpoint id, version) of the weights that made it: while a
        deployment moves to a new version, one response may come from either."""
        self._queue.set(self._batcher.queued_texts + len(texts))
        served = self._served
        return [(p, served) for p in await self._batcher.submit(texts)]

    async def classify_merged(self, texts: list[str]) -> tuple[str, list[tuple[Prediction, tuple[str, str | None]]]]:
        """`classify`, tagged with this replica's id (the Ingress counts live replicas)."""
        return self._replica_id, await self.classify(texts)

    def _forward(self, texts: list[str]) -> list[Prediction]:
        try:
            preds = self._predictor.predict(texts)
        except Exception:
            self._failures += 1
            raise
        self._failures = 0
        self._texts.inc(len(texts))
        return preds

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Texts waiting for or in the forward pass: load, however requests were merged."""
        return {TEXTS_IN_FLIGHT: float(self._batcher.queued_texts + self._batcher.forwarding)}

    def _batch_formed(self, size: int) -> None:
        self._batch_size.observe(size)
        self._queue.set(self._batcher.queued_texts)

    def info(self) -> dict[str, Any]:
        p = self._predictor
        return {"model": p.model_name, "version": self._version, "checkpoint": p.info, "labels": p.labels,
                "max_length": p.max_length, "backend": p.backend, "device": str(p.device),
                "warmup_ms": round(self._warmup_ms, 1)}

    def check_health(self) -> None:
        """Serve replaces a replica whose forward pass keeps failing."""
        if self._failures >= 3:
            raise RuntimeError(f"{self._failures} consecutive forward passes failed")


class Ingress:
    """HTTP front: validate, authenticate, split into batches, retry on replica loss.

    With `classifier=None` (topology=single) it loads the model itself and classifies
    in-process: no actor hop between the HTTP front and the forward pass. `ingress_class`
    adds the routes and sets `body_type` and `fast_path_key` for its config.
    """

    body_type: Any = None
    """The validated `{"text"}` | `{"texts"}` body type with the config's limits."""
    fast_path_key: str | None = None
    """This app's key in `http.FAST_CLASSIFY` (`app.state.fast_path_key`)."""

    def __init__(self, classifier: Any, settings: dict[str, Any], checkpoint: str | None = None,
                 bundle: dict[str, str] | None = None):
        s = replace(ServeConfig(), **settings)
        self._classifier = classifier
        self._local = Classifier(checkpoint, settings, bundle) if classifier is None else None
        self._token = server_token(s.auth_token_env, s.auth_token_file)
        self._timeout_s = s.request_timeout_s
        self._limits = {"max_texts": s.max_texts, "max_text_chars": s.max_text_chars}
        self._info: dict[str, Any] | None = None
        self._model_name = serve.get_replica_context().app_name  # the v2 protocol's model name
        self._coalescer = None
        if s.coalesce and classifier is not None:
            queue = Gauge("distilray_ingress_queue_length",
                          "Texts waiting at the Ingress for a Classifier call")
            merged = classifier.classify_merged  # a handle per method: made once, here
            self._coalescer = CallCoalescer(
                lambda texts: self._call_classifier(merged, texts), s.max_batch_size,
                on_queue=queue.set, max_wait_s=s.max_queue_wait_s, wait_passes=s.queue_wait_passes,
                retry_after_s=s.retry_after_s, calls_per_source=s.calls_per_replica,
                batches_ahead=s.max_batches_ahead)
        elif classifier is not None:
            self._per_request = classifier.classify  # a handle per method: made once, here
        if s.http_fast_path and self.fast_path_key is not None:
            self._body = TypeAdapter(self.body_type)  # the body validator, built in the replica
            FAST_CLASSIFY[self.fast_path_key] = self._fast_classify
        # the queue that admits requests, for `http.AdmissionGate` (registered on first answer)
        self._admission = (self._coalescer if self._coalescer is not None
                           else self._local._batcher if self._local is not None else None)
        self._gate_pending = s.http_fast_path and self._admission is not None
        self._max_request_bytes = s.max_request_bytes

    def _gate_check(self, headers: list[tuple[bytes, bytes]], waited_s: float) -> Any:
        """`AdmissionGate`'s check: the 503 for a request the queue would refuse now, having
        waited `waited_s` before it was read, or None."""
        if not gate_passes(headers, self._token, self._max_request_bytes):
            return None
        assert self._admission is not None
        refused = self._admission.refusal(waited_s)
        return None if refused is None else overloaded(refused)

    def _authorized(self, request: Request) -> bool:
        return bearer_matches(self._token, request.headers.get("authorization", ""))

    async def _fast_classify(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> Any:
        """`ClassifyFastPath`'s handler: the answer, or None to take the FastAPI route."""
        if self._token is not None and not bearer_matches(self._token, next(
                (v.decode("latin-1") for k, v in headers if k == b"authorization"), "")):
            return None
        try:
            parsed = self._body.validate_json(body)
        except ValidationError:
            return None
        return await self._answer(parsed)

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._replica_info()
        return self._info

    async def _replica_info(self) -> dict[str, Any]:
        if self._local is not None:
            return self._local.info()
        return await self._classifier.info.remote()

    def check_health(self) -> None:
        if self._local is not None:
            self._local.check_health()

    async def _classify(self, texts: list[str]) -> list[tuple[Prediction, tuple[str, str | None]]]:
        """All of a request's texts, admitted (or refused) once: the queue that takes them
        splits them into passes or calls of max_batch_size."""
        if self._local is not None:
            return await self._local.classify(texts)
        if self._coalescer is not None:
            return await self._coalescer.submit(texts)
        return await self._call_classifier(self._per_request, texts)

    async def _call_classifier(self, method: Any, texts: list[str]) -> Any:
        # Classification is idempotent: when a Classifier replica dies mid-request the
        # router marks it dead, and the retry lands on a live (or replacement) replica.
        for attempt in range(1, 4):
            try:
                return await method.remote(texts)
            except RayActorError:
                if attempt == 3:
                    raise
                log.warning("Classifier replica lost mid-request; retry %d/2", attempt)
                await asyncio.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    async def classify(self, body: Any, request: Request) -> Any:
        """`POST /v1/classify` through FastAPI: the token, then `_answer`."""
        if not self._authorized(request):
            return error_json(401, "unauthorized", f"{UNAUTHORIZED} with the server's token",
                              **{"WWW-Authenticate": "Bearer"})
        return await self._answer(body)

    async def _answer(self, body: Any) -> Any:
        """Classify a validated `{"text"}` or `{"texts"}` body: the JSON answer or error."""
        if self._gate_pending:  # on the loop that answers requests, once it is known
            ADMISSION[:] = [(asyncio.get_running_loop(), self._gate_check)]
            self._gate_pending = False
        texts = [body.text] if hasattr(body, "text") else list(body.texts)
        results = await self._predictions(texts)
        if isinstance(results, JSONResponse):
            return results
        info = await self._model_info()
        checkpoint, version = results[0][1]  # the weights that answered (during a version change, either)
        # built by hand: ClassifyResponse documents it, re-validating it costs per request
        return JSONResponse({"model": info["model"], "checkpoint": checkpoint, "version": version,
                             "predictions": [asdict(p) for p, _ in results]})

    async def _predictions(self, texts: list[str]) -> Any:
        """(prediction, (checkpoint id, version)) of validated texts in order, or the error
        answer (504, 503)."""
        try:
            results = await asyncio.wait_for(self._classify(texts), self._timeout_s)
        except TimeoutError:
            return error_json(504, "timeout", f"classifying {len(texts)} text(s) took longer "
                              f"than serve.request_timeout_s={self._timeout_s}s; retry later, "
                              "send fewer texts, or raise the timeout")
        except BackPressureError as exc:
            retry = exc.retry_after_s
            headers = {"Retry-After": str(math.ceil(retry))} if retry is not None else {}
            return error_json(503, "overloaded", f"all Classifier replicas are busy "
                              f"({exc.message}); retry after the Retry-After delay", **headers)
        except QueueFull as exc:
            return overloaded(exc)
        return results

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> Any:
        try:
            info = await asyncio.wait_for(self._replica_info(), 5.0)
        except (TimeoutError, RayActorError, BackPressureError):
            return error_json(503, "not_ready", "no Classifier replica answered within 5s")
        self._info = info
        return {"status": "ready", "model": info["model"], "version": info["version"],
                "checkpoint": info["checkpoint"]["id"], "warmup_ms": info["warmup_ms"]}

    async def model_info(self, request: Request) -> Any:
        """Asks a replica each time: after a version change it names the new version."""
        if not self._authorized(request):
            return error_json(401, "unauthorized", UNAUTHORIZED, **{"WWW-Authenticate": "Bearer"})
        self._info = await self._replica_info()
        return {**self._info, **self._limits}

    async def v2(self, request: Request, name: str | None, call: str) -> Any:
        """The Open Inference Protocol routes (`oip`): `call` is live | ready | model |
        model_ready | infer; errors in the protocol's `{"error"}` shape."""
        try:
            if call == "live":
                return {"live": True}
            if call == "ready":
                ready = await self.readyz()
                return oip.from_v1_error(ready) if isinstance(ready, JSONResponse) else {"ready": True}
            if not self._authorized(request):
                raise oip.OipError(401, f"{UNAUTHORIZED} with the server's token",
                                   {"WWW-Authenticate": "Bearer"})
            oip.check_model(name or "", self._model_name)
            info = await self._model_info()
            version = info.get("version") or info["checkpoint"]["sha256_12"]
            if call == "model":
                return oip.model_metadata(self._model_name, version, info["labels"])
            if call == "model_ready":  # a replica answers now, as /readyz
                ready = await self.readyz()
                return (oip.from_v1_error(ready) if isinstance(ready, JSONResponse)
                        else {"name": self._model_name, "ready": True})
            req, texts, wanted = oip.parse_infer(await request.body(),
                                                 request.headers.get(oip.INFER_HEADER),
                                                 **self._limits)
        except oip.OipError as exc:
            return oip.error_response(exc.status, exc.message, exc.headers)
        results = await self._predictions(texts)
        if isinstance(results, JSONResponse):
            return oip.from_v1_error(results)
        answered = results[0][1][1] or version  # the store version that answered, else the sha
        return JSONResponse(oip.infer_response(req, self._model_name, answered, info["labels"],
                                               [p for p, _ in results], wanted))


def overloaded(exc: QueueFull) -> JSONResponse:
    """The 503 of a request the queue refused, with its `Retry-After`."""
    return error_json(503, "overloaded", f"the server is at capacity: this request {exc} "
                      "(serve.max_queue_wait_s); retry after the Retry-After delay",
                      **{"Retry-After": str(math.ceil(exc.retry_after_s))})


def ingress_class(app: Any, body_type: Any) -> type:
    """`Ingress` with its routes on `app` (from `http.make_fastapi_app`), wrapped by Serve.

    The subclass is built per config, so Serve pickles it by value; it holds only these
    route methods (the routes' names, paths and OpenAPI entries), which hand over to the
    module-level `Ingress` methods of the same name at once.
    """

    class RoutedIngress(Ingress):
        @app.post(CLASSIFY_PATH, response_model=ClassifyResponse, responses=ERROR_RESPONSES,
                  summary="Classify one text or a list of texts")
        async def classify(self, body: body_type, request: Request) -> Any:  # type: ignore[valid-type]
            return await Ingress.classify(self, body, request)

        @app.get("/healthz", summary="The HTTP front is up")
        async def healthz(self) -> dict[str, str]:
            return await Ingress.healthz(self)

        @app.get("/readyz", summary="A model replica is loaded and has run a warm-up forward pass",
                 responses={503: {"model": ErrorResponse}})
        async def readyz(self) -> Any:
            return await Ingress.readyz(self)

        @app.get("/v1/model", summary="What is served: checkpoint, labels, limits",
                 responses={401: {"model": ErrorResponse}})
        async def model_info(self, request: Request) -> Any:
            return await Ingress.model_info(self, request)

        @app.get(oip.V2 + "/health/live", summary="Open Inference Protocol: server live")
        async def v2_live(self, request: Request) -> Any:
            return await Ingress.v2(self, request, None, "live")

        @app.get(oip.V2 + "/health/ready", summary="Open Inference Protocol: server ready",
                 responses={503: {"model": oip.OipErrorBody}})
        async def v2_ready(self, request: Request) -> Any:
            return await Ingress.v2(self, request, None, "ready")

        @app.get(oip.V2 + "/models/{name}", summary="Open Inference Protocol: model metadata",
                 response_model=oip.ModelMetadata, responses=oip.ERROR_RESPONSES)
        async def v2_model(self, name: str, request: Request) -> Any:
            return await Ingress.v2(self, request, name, "model")

        @app.get(oip.V2 + "/models/{name}/ready", summary="Open Inference Protocol: model ready",
                 responses=oip.ERROR_RESPONSES)
        async def v2_model_ready(self, name: str, request: Request) -> Any:
            return await Ingress.v2(self, request, name, "model_ready")

        @app.post(oip.V2 + "/models/{name}/infer", response_model=oip.InferResponse,
                  responses=oip.ERROR_RESPONSES, openapi_extra=oip.INFER_OPENAPI,
                  summary="Open Inference Protocol: classify a BYTES tensor of texts")
        async def v2_infer(self, name: str, request: Request) -> Any:
            return await Ingress.v2(self, request, name, "infer")

    RoutedIngress.body_type = body_type
    RoutedIngress.fast_path_key = app.state.fast_path_key
    return serve.ingress(app)(RoutedIngress)


def deployment(cls: type, options: dict[str, Any]) -> Any:
    """`cls` as a Serve deployment with `options`, an entry of `app.deployment_options`."""
    opts = dict(options)
    return serve.deployment(name=opts.pop("name"))(cls).options(**opts)
