"""The HTTP contract: request bodies with this server's limits, responses, readable errors.

Pydantic only (FastAPI's JSONResponse is imported where an error is answered); the OpenAPI
schema FastAPI publishes is built from these models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# "Some character outside Unicode White_Space", spelled out: `\S` differs between the
# validator (Rust regex), JSON Schema (ECMA-262) and Python `re` (e.g. on U+0085), and the
# OpenAPI schema must accept exactly what the server accepts.
TEXTS_IN_FLIGHT = "texts_in_flight"
"""The custom autoscaling metric a coalesced Classifier reports and its policy reads."""

NOT_ONLY_WHITESPACE = (r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f"
                       r"\u205f\u3000]")


class PredictionOut(BaseModel):
    label: str = Field(description="The most probable class.")
    score: float = Field(ge=0.0, le=1.0, description="Probability of `label`.")
    probabilities: dict[str, float] = Field(description="Probability of every class.")


class ClassifyResponse(BaseModel):
    model: str = Field(description="Base model the checkpoint was fine-tuned from.")
    checkpoint: str = Field(description="`run@step:sha256[:12]` of the served weights.")
    version: str | None = Field(description="`NAME@vN` of the model-store version that answered "
                                "(null when a checkpoint directory is served).")
    predictions: list[PredictionOut] = Field(description="One per input text, in order.")


class ErrorItem(BaseModel):
    field: str = Field(description="Where the problem is, e.g. `texts[3]` or `body`.")
    message: str
    limit: int | None = Field(default=None, description="The limit that was exceeded, if any.")


class ErrorResponse(BaseModel):
    error: str = Field(description="Short machine-readable kind, e.g. `invalid_request`.")
    message: str = Field(description="One line saying what is wrong and how to fix it.")
    detail: list[ErrorItem] = Field(default_factory=list)


def request_models(max_texts: int, max_text_chars: int | None) -> tuple[type[BaseModel], type[BaseModel]]:
    """`{"text": ...}` and `{"texts": [...]}` bodies with this server's limits in their schema."""
    one_text = Annotated[str, StringConstraints(min_length=1, max_length=max_text_chars,
                                                pattern=NOT_ONLY_WHITESPACE)]

    class TextRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"text": "a charming and often affecting journey"}]})
        text: one_text = Field(description=(
            f"1 to {max_text_chars} characters" if max_text_chars else "Any length (truncated "
            "to the model's max_length tokens)") + ", not all whitespace.")

    class TextsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "examples": [{"texts": ["loved it", "a tedious, lifeless script"]}]})
        texts: list[one_text] = Field(min_length=1, max_length=max_texts,
                                  description=f"1 to {max_texts} texts, each like `text`.")

    return TextRequest, TextsRequest


def _field_name(loc: Sequence[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "TextRequest", "TextsRequest")]
    name = ""
    for p in parts:
        if isinstance(p, int):
            name += f"[{p}]"
        elif not str(p).startswith(("function-", "union")):
            name += f".{p}" if name else str(p)
    return name or "body"


def describe_validation_errors(errors: Sequence[dict[str, Any]], body: Any, max_texts: int,
                               max_text_chars: int | None) -> tuple[int, ErrorResponse]:
    """Turn pydantic errors into (status, one readable error naming each field and limit)."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, ErrorResponse(
            error="malformed_json", message="the request body is not valid JSON; send "
            '{"text": "..."} or {"texts": ["...", ...]} with Content-Type: application/json',
            detail=[ErrorItem(field="body", message="invalid JSON")])
    if not isinstance(body, dict) or ("text" in body) == ("texts" in body):
        return 422, ErrorResponse(
            error="invalid_request",
            message='send exactly one of {"text": "..."} or {"texts": ["...", ...]}',
            detail=[ErrorItem(field="body", message="expected an object with exactly one of "
                                                     "the fields 'text' or 'texts'")])
    branch = "TextRequest" if "text" in body else "TextsRequest"
    items: list[ErrorItem] = []
    for err in errors:
        loc = list(err.get("loc", ()))
        if any(b in loc for b in ("TextRequest", "TextsRequest")) and branch not in loc:
            continue  # the error belongs to the other shape of body
        field, kind = _field_name(loc), err.get("type", "")
        if kind == "string_too_long":
            items.append(ErrorItem(field=field, message=f"{field} is longer than "
                                   f"{max_text_chars} characters", limit=max_text_chars))
        elif kind == "string_too_short" or kind == "string_pattern_mismatch":
            items.append(ErrorItem(field=field, message=f"{field} is empty or only whitespace"))
        elif kind == "too_long":
            items.append(ErrorItem(field=field, message=f"{field} has more than {max_texts} "
                                   "texts; split the request", limit=max_texts))
        elif kind == "too_short":
            items.append(ErrorItem(field=field, message=f"{field} is empty; send at least one text"))
        elif kind == "string_type":
            items.append(ErrorItem(field=field, message=f"{field} must be a string"))
        elif kind == "list_type":
            items.append(ErrorItem(field=field, message=f"{field} must be a list of strings"))
        elif kind == "extra_forbidden":
            items.append(ErrorItem(field=field, message=f"unknown field '{field}'; send only "
                                   "'text' or 'texts'"))
        else:
            items.append(ErrorItem(field=field, message=f"{field}: {err.get('msg', kind)}"))
    if not items:
        items = [ErrorItem(field="body", message="invalid request")]
    return 422, ErrorResponse(error="invalid_request",
                              message="; ".join(i.message for i in items[:5]), detail=items)


def error_json(status: int, error: str, message: str, **headers: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers or None,
                        content=ErrorResponse(error=error, message=message).model_dump())


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token"},
    413: {"model": ErrorResponse, "description": "Request body over serve.max_request_bytes"},
    422: {"model": ErrorResponse, "description": "Invalid text(s): the field and limit are named"},
    503: {"model": ErrorResponse, "description": "Overloaded (see Retry-After) or no replica"},
    504: {"model": ErrorResponse, "description": "Classification took longer than the request timeout"},
}
"""The error answers of `POST /v1/classify`, for its OpenAPI entry."""
