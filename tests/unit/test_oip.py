"""The Open Inference Protocol's parsing and answers, without a server."""

from __future__ import annotations

import json
import struct

import pytest

from distilray.serve import oip
from distilray.serve.predictor import Prediction


def body(data=None, shape=None, datatype="BYTES", **extra) -> bytes:
    tensor = {"name": "text", "shape": shape or [len(data or [])], "datatype": datatype}
    if data is not None:
        tensor["data"] = data
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary_body(texts: list[str]) -> tuple[bytes, str]:
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, str(len(header))


def test_json_and_binary_tensors_give_the_texts():
    _, texts, wanted = oip.parse_infer(body(["a", "b c"]), None, 8, None)
    assert texts == ["a", "b c"] and wanted == ["label", "probabilities"]
    _, texts, _ = oip.parse_infer(body([["a"], ["é"]], shape=[2, 1]), None, 8, None)
    assert texts == ["a", "é"]
    raw, split = binary_body(["naïve", "ok"])
    _, texts, _ = oip.parse_infer(raw, split, 8, None)
    assert texts == ["naïve", "ok"]


@pytest.mark.parametrize("raw, header, words", [
    (b"{oops", None, "not valid JSON"),
    (body(["a"], datatype="FP32"), None, "datatype FP32"),
    (body(["a", "b"], shape=[3]), None, "2 elements but shape [3]"),
    (body(["a"], shape=[1, 2]), None, "shape [1, 2]"),
    (body([" \t"]), None, "text[0] is empty or only whitespace"),
    (body(["x"] * 9), None, "more than the limit 8 (serve.max_texts)"),
    (body(["y" * 11]), None, "longer than 10 characters (serve.max_text_chars)"),
    (body([]), None, "is empty"),
    (body([1]), None, "must be a string"),
    (body(None, shape=[1]), None, "has no data"),
    (body(["a"], outputs=[{"name": "logits"}]), None, "unknown output(s) ['logits']"),
    (body(["a"], extra=1), None, "extra"),
    (binary_body(["abc"])[0][:-1], binary_body(["abc"])[1], "binary_data_size="),
    (b"{}", "99", "outside the body"),
])
def test_bad_requests_are_400_naming_the_problem(raw, header, words):
    with pytest.raises(oip.OipError) as err:
        oip.parse_infer(raw, header, 8, 10)
    assert err.value.status == 400 and words in err.value.message


def test_infer_response_tensors_and_metadata():
    preds = [Prediction("positive", 0.75, {"negative": 0.25, "positive": 0.75}),
             Prediction("negative", 0.9, {"negative": 0.9, "positive": 0.1})]
    req, _, wanted = oip.parse_infer(body(["a", "b"], id="r7"), None, 8, None)
    out = oip.infer_response(req, "m", "abc", ["negative", "positive"], preds, wanted)
    assert out["id"] == "r7" and out["model_version"] == "abc"
    label, probs = out["outputs"]
    assert label == {"name": "label", "shape": [2], "datatype": "BYTES",
                     "data": ["positive", "negative"]}
    assert probs["shape"] == [2, 2] and probs["data"] == [0.25, 0.75, 0.9, 0.1]
    assert oip.InferResponse.model_validate(out)
    meta = oip.model_metadata("m", "abc", ["a", "b", "c"])
    assert oip.ModelMetadata.model_validate(meta).outputs[1].shape == [-1, 3]
    with pytest.raises(oip.OipError, match="not served here") as err:
        oip.check_model("other", "m")
    assert err.value.status == 404


def test_openapi_body_schema_has_no_dangling_refs():
    text = json.dumps(oip.INFER_OPENAPI)
    assert "$ref" not in text and "$defs" not in text
    schema = oip.INFER_OPENAPI["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["inputs"]["maxItems"] == 1


def test_v1_errors_keep_status_and_retry_after_in_the_protocol_shape():
    from distilray.serve.schema import error_json

    overloaded = error_json(503, "overloaded", "all Classifier replicas are busy", **{"Retry-After": "2"})
    answer = oip.from_v1_error(overloaded)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
    assert json.loads(answer.body) == {"error": "all Classifier replicas are busy"}
    assert oip.is_v2("/v2/models/m/infer") and oip.is_v2("/v2") and not oip.is_v2("/v2x")
