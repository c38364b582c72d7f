"""`benchmarks/gpu_check.py --smoke`: the GPU machine's script runs end to end on CPU."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # starts a Serve app: ~60 s on 2 loaded cores

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_part(ray_4_cpus):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = gpu_check.main(["--smoke", "--port", str(port)])
    by_part = {(r["part"], r["variant"]): r for r in rows}
    assert set(by_part) == {("train", "fp32"), ("train", "bf16"), ("serve", "float32 c=4"),
                            ("batch", "float32")}
    assert all(by_part[("train", p)]["samples_per_s"] > 0 for p in ("fp32", "bf16"))
    serve = by_part[("serve", "float32 c=4")]
    assert serve["n"] == 32 and serve["errors"] == 0 and serve["agreement"] == 1.0
    assert serve["p99"] > 0 and by_part[("batch", "float32")]["rows_per_s"] > 0
    assert gpu_check.flops_per_sample(gpu_check.BASE, 128) == pytest.approx(
        6 * 6 * (4 * 768**2 + 2 * 768 * 3072) * 128 + 6 * 12 * 128**2 * 768)
