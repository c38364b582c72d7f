"""The Open Inference Protocol (KServe v2) REST routes' contract: parse and answer, no Ray.

`POST /v2/models/{name}/infer` takes one BYTES input tensor of texts (shape `[n]` or
`[n, 1]`, JSON `data` or the binary tensor extension that `tritonclient` sends by default)
and answers a BYTES `label` tensor `[n]` and an FP32 `probabilities` tensor
`[n, num_labels]` (JSON data). The texts pass the same limits as `/v1/classify`
(`max_texts`, `max_text_chars`, not empty or only whitespace) and then the same batching.
Errors use the protocol's shape, `{"error": "<what is wrong>"}`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distilray.serve.schema import NOT_ONLY_WHITESPACE

V2 = "/v2"
INFER_HEADER = "inference-header-content-length"
OUTPUTS = ("label", "probabilities")
_HAS_TEXT = re.compile(NOT_ONLY_WHITESPACE)


class OipError(Exception):
    """A request the protocol answers with `{"error": message}` and `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Any name; the one input tensor holds the texts.")
    shape: list[int] = Field(description="`[n]` or `[n, 1]`.")
    datatype: str = Field(description="`BYTES` (UTF-8 texts).")
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="The texts, unless sent as binary.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="`label` or `probabilities`.")
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                    "data": ["loved it", "a tedious, lifeless script"]}]}]})
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OipErrorBody(BaseModel):
    error: str = Field(description="What is wrong with the request, naming the field or limit.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OipErrorBody, "description": text} for code, text in (
        (400, "Malformed or invalid request: the tensor, field or limit is named"),
        (401, "Missing or wrong bearer token"), (404, "No such model"),
        (413, "Request body over serve.max_request_bytes"),
        (503, "Overloaded (see Retry-After) or no replica"), (504, "Request timeout"))}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with its `$defs` references replaced by the definitions (OpenAPI has no $defs)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


_INFER_SCHEMA = InferRequest.model_json_schema()
INFER_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": _inline(_INFER_SCHEMA, _INFER_SCHEMA.get("$defs", {}))}}}}
"""The infer route's OpenAPI body: the route reads the raw body itself (for the binary
tensor extension), so FastAPI is told its schema."""


def model_metadata(name: str, version: str, labels: Sequence[str]) -> dict[str, Any]:
    return {"name": name, "versions": [version], "platform": "distilray",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32",
                         "shape": [-1, len(labels)]}]}


def check_model(name: str, served: str) -> None:
    if name != served:
        raise OipError(404, f"model '{name}' is not served here; this server serves '{served}'")


def parse_infer(body: bytes, header_length: str | None, max_texts: int,
                max_text_chars: int | None) -> tuple[InferRequest, list[str], list[str]]:
    """(request, texts, requested output names) of an infer body, or an OipError (400)."""
    binary = b""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise OipError(400, f"Inference-Header-Content-Length={header_length!r} is not an "
                           "integer") from None
        if not 0 <= split <= len(body):
            raise OipError(400, f"Inference-Header-Content-Length={split} is outside the "
                           f"body's {len(body)} bytes")
        body, binary = body[:split], body[split:]
    try:
        req = InferRequest.model_validate_json(body)
    except ValidationError as exc:
        raise OipError(400, "invalid inference request: " + describe(exc)) from None
    tensor = req.inputs[0]
    texts = _texts(tensor, binary)
    _check_texts(tensor.name, texts, max_texts, max_text_chars)
    wanted = [o.name for o in req.outputs] if req.outputs else list(OUTPUTS)
    unknown = [n for n in wanted if n not in OUTPUTS]
    if unknown:
        raise OipError(400, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return req, texts, wanted


def describe(exc: ValidationError) -> str:
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return "the body is not valid JSON"
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                     for e in exc.errors()[:5])


def _texts(tensor: RequestInput, binary: bytes) -> list[str]:
    if tensor.datatype != "BYTES":
        raise OipError(400, f"input '{tensor.name}' has datatype {tensor.datatype}; send the "
                       "texts as a BYTES tensor")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise OipError(400, f"input '{tensor.name}' has shape {shape}; send [n] or [n, 1] texts")
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise OipError(400, f"input '{tensor.name}' has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise OipError(400, f"input '{tensor.name}': binary_data_size={size!r} but "
                           f"{len(binary)} bytes follow the JSON header")
        items = _unpack_bytes(tensor.name, binary)
    else:
        if tensor.data is None:
            raise OipError(400, f"input '{tensor.name}' has no data")
        items = _flatten(tensor.data)
    if len(items) != shape[0]:
        raise OipError(400, f"input '{tensor.name}' has {len(items)} elements but shape {shape}")
    return [_decode(tensor.name, i, item) for i, item in enumerate(items)]


def _flatten(data: list[Any]) -> list[Any]:
    return [x for row in data for x in (row if isinstance(row, list) else [row])]


def _unpack_bytes(name: str, raw: bytes) -> list[bytes]:
    """The binary BYTES layout: each element a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise OipError(400, f"input '{name}': binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise OipError(400, f"input '{name}': binary element of {length} bytes runs past "
                           "the body")
        out.append(raw[pos: pos + length])
        pos += length
    return out


def _decode(name: str, index: int, item: Any) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise OipError(400, f"{name}[{index}] is not UTF-8 text") from None
    if not isinstance(item, str):
        raise OipError(400, f"{name}[{index}] must be a string, got {type(item).__name__}")
    return item


def _check_texts(name: str, texts: list[str], max_texts: int, max_text_chars: int | None) -> None:
    if not texts:
        raise OipError(400, f"input '{name}' is empty; send at least one text")
    if len(texts) > max_texts:
        raise OipError(400, f"input '{name}' has {len(texts)} texts, more than the limit "
                       f"{max_texts} (serve.max_texts); split the request")
    for i, text in enumerate(texts):
        if not _HAS_TEXT.search(text):
            raise OipError(400, f"{name}[{i}] is empty or only whitespace")
        if max_text_chars is not None and len(text) > max_text_chars:
            raise OipError(400, f"{name}[{i}] is longer than {max_text_chars} characters "
                           "(serve.max_text_chars)")


def infer_response(req: InferRequest, model_name: str, version: str, labels: Sequence[str],
                   predictions: Sequence[Any], wanted: Sequence[str]) -> dict[str, Any]:
    """The response body: `label` [n] BYTES and `probabilities` [n, num_labels] FP32."""
    n = len(predictions)
    tensors = {
        "label": {"name": "label", "shape": [n], "datatype": "BYTES",
                  "data": [p.label for p in predictions]},
        "probabilities": {"name": "probabilities", "shape": [n, len(labels)], "datatype": "FP32",
                          "data": [p.probabilities[lab] for p in predictions for lab in labels]},
    }
    out: dict[str, Any] = {"model_name": model_name, "model_version": version,
                           "outputs": [tensors[w] for w in wanted]}
    if req.id is not None:
        out["id"] = req.id
    return out


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": message}, headers=headers or None)


def from_v1_error(response: Any) -> Any:
    """A `/v1` error answer (`{"error", "message"}`) in the protocol's shape, same status."""
    body = json.loads(bytes(response.body))
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return error_response(response.status_code, body.get("message") or body.get("error"), headers)


def is_v2(path: str) -> bool:
    return path == V2 or path.startswith(V2 + "/")
