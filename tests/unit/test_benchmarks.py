"""The benchmark scripts' own checks (pure functions; no server started)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import serve_throughput  # noqa: E402


def test_a_round_of_few_latencies_is_flagged_as_undercounting_requests_per_second():
    row = serve_throughput.summarize("(d) defaults", 32, [0.2] * 200, 2.6, 0)  # p50 200 ms
    warning = serve_throughput.short_rounds(row, elapsed=2.6, rounds=2)  # 1.3 s per round
    assert warning is not None
    assert "(d) defaults at concurrency 32" in warning
    assert "rounds of 1.3 s are 6 median latencies long" in warning
    assert "~15%" in warning and "--requests" in warning
    # 1200-request rounds at the same latency: 30 latencies each, steady state
    assert serve_throughput.short_rounds(row, elapsed=12.0, rounds=2) is None


def test_a_level_without_answers_gets_no_round_warning():
    row = serve_throughput.summarize("(b)", 32, [], 5.0, 10)
    assert serve_throughput.short_rounds(row, elapsed=5.0, rounds=1) is None
