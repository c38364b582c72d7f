"""`distilray predict`: classify texts through a running `distilray serve` over HTTP.

`classify(url, texts)` is the Python client: it splits long lists into requests the server
accepts, sends the bearer token, and turns HTTP errors into one readable `DistilrayError`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from distilray.errors import DistilrayError

DEFAULT_TOKEN_ENV = "DISTILRAY_SERVE_TOKEN"


def read_texts(texts: Sequence[str], file: str | None) -> list[str]:
    """Texts from the command line, then one per non-blank line of `file` (`-` = stdin)."""
    out = [t for t in texts if t.strip()]
    if file:
        if file == "-":
            lines: Iterable[str] = sys.stdin.read().splitlines()
        else:
            try:
                lines = Path(file).expanduser().read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise DistilrayError(f"--file {file}: cannot read it ({exc.strerror})") from None
            except UnicodeDecodeError:
                raise DistilrayError(f"--file {file}: not UTF-8 text") from None
        out += [line.strip() for line in lines if line.strip()]
    if not out:
        raise DistilrayError("no texts to classify: pass them as arguments or with --file PATH")
    return out


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return json.dumps(body)[:300]


def classify(url: str, texts: Sequence[str], token: str | None = None, batch_size: int = 32,
             timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """One prediction dict (label, score, probabilities) per text, in order."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/") + "/v1/classify"
    out: list[dict[str, Any]] = []
    with requests.Session() as session:
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i: i + batch_size])
            try:
                r = session.post(endpoint, json={"texts": chunk}, headers=headers,
                                 timeout=timeout_s)
            except requests.RequestException as exc:
                raise DistilrayError(f"cannot reach {endpoint}: {type(exc).__name__}; is "
                                     "`distilray serve` running there?") from None
            if r.status_code != 200:
                hint = ""
                if r.status_code == 401:
                    hint = f" (pass --token or set ${DEFAULT_TOKEN_ENV})"
                elif r.status_code == 503 and r.headers.get("Retry-After"):
                    hint = f" (retry after {r.headers['Retry-After']}s)"
                raise DistilrayError(f"{endpoint} answered {r.status_code}: "
                                     f"{_error_message(r)}{hint}")
            out += r.json()["predictions"]
    return out
