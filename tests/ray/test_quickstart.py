"""`distilray quickstart` end to end, as a user runs it: train → search → serve → classify."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.quiet]


def test_quickstart_runs_the_whole_flow_within_five_minutes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port = free_port()
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "distilray", "quickstart", "--set", f"serve.port={port}",
         "--set", f"train.storage_path={tmp_path}", "--set", f"tune.storage_path={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.time() - started
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    for step in range(1, 5):
        assert f"quickstart {step}/4" in log, f"progress banner {step}/4 missing"
    assert re.search(r"step \d+/\d+ .* samples/s .*ETA", log), "training progress was not shown"
    rows = re.findall(r"^\s+(positive|negative) (\d\.\d\d)  (.+)$", out.stdout, re.M)
    assert len(rows) == 4
    assert rows[0][0] == "positive" and rows[1][0] == "negative"  # the two unambiguous ones
    report = re.search(r"report\s+(\S+report\.html)", out.stdout)
    assert report and Path(report.group(1)).exists()
    best = next(tmp_path.glob("quickstart-search-*/best/model.safetensors"))
    assert best.exists()
    with socket.socket() as s:  # shut down cleanly: nothing listens on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert elapsed < 300, f"quickstart took {elapsed:.0f}s (goal: 5 minutes on 2 cores)"
