"""Soak: `distilray serve` held at ~70% of its measured capacity for minutes.

    python benchmarks/soak.py [--checkpoint DIR | --model offline:minilm] [--minutes 10] \
        [--load 0.7] [--set serve.KEY=VALUE ...]

1. Start the server with the default config (plus any --set), on a local Ray instance.
2. Capacity: 32 closed-loop clients for --capacity-s seconds (after a warm-up) → requests/s.
3. Soak: an open loop at --load × that rate (Poisson arrivals, seeded) for --minutes; each
   request's latency counts from its scheduled send time, so a stalled server cannot hide
   queueing from the figures (no coordinated omission).
4. Per minute: requests, errors (any status but 200, or no answer), p50 and p99, and the RSS
   of every Serve replica process (Ingress and Classifier, read from /proc via psutil).

Goals (issue 21): no error, p99 of the last minute within 1.2× the first, RSS growth < 10%
(last minute against the first, per replica). The script prints the table and the three
verdicts; it exits 0 either way (a benchmark reports, the test suite asserts).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import free_port, load_texts, make_checkpoint  # noqa: E402


async def closed_loop_rps(url: str, texts: list[str], clients: int, seconds: float) -> float:
    import aiohttp

    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        deadline = time.monotonic() + seconds

        async def client(i: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(url, json={"text": texts[(i + done) % len(texts)]}) as r:
                    await r.read()
                    done += r.status == 200

        t0 = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return done / (time.monotonic() - t0)


class ReplicaMemory:
    """RSS of every Serve replica process of `app`, found by the process title Ray gives it
    (`ray::ServeReplica:<app>:<deployment>`): no State API needed, which a Ray instance
    started without its dashboard (as `distilray serve` starts one) lacks."""

    def __init__(self, app: str):
        self.prefix = f"ray::ServeReplica:{app}:"

    def sample(self) -> dict[str, float]:
        import psutil

        rss = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith(self.prefix):
                name = title[len(self.prefix):].split()[0].split(".")[0]
                try:
                    rss[f"{name}-{proc.info['pid']}"] = proc.memory_info().rss / 2**20
                except psutil.NoSuchProcess:
                    pass
        return rss


async def open_loop(url: str, texts: list[str], rate: float, minutes: int, memory: ReplicaMemory,
                    seed: int = 0) -> list[dict]:
    """Poisson arrivals at `rate`/s; one row of figures per minute."""
    import aiohttp

    rng = random.Random(seed)
    rows: list[dict] = []
    minute_lat: list[float] = []
    minute_errors = 0
    in_flight: set[asyncio.Task] = set()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(text: str, scheduled: float) -> None:
            nonlocal minute_errors
            try:
                async with session.post(url, json={"text": text}) as r:
                    await r.read()
                    ok = r.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                minute_lat.append(time.monotonic() - scheduled)
            else:
                minute_errors += 1

        start = time.monotonic()
        next_at, i = start, 0
        for minute in range(1, minutes + 1):
            end = start + 60 * minute
            while next_at < end:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(texts[i % len(texts)], next_at))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                i += 1
                next_at += rng.expovariate(rate)
            lat = np.asarray(minute_lat) * 1000 if minute_lat else np.asarray([np.nan])
            rows.append({"minute": minute, "answered": len(minute_lat), "errors": minute_errors,
                         "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                         "rss_mb": memory.sample()})
            print(f"minute {minute:2d}: {rows[-1]['answered']} ok, {minute_errors} errors, "
                  f"p50 {rows[-1]['p50_ms']:.0f} ms, p99 {rows[-1]['p99_ms']:.0f} ms, RSS "
                  + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(rows[-1]["rss_mb"].items())),
                  flush=True)
            minute_lat, minute_errors = [], 0
        await asyncio.gather(*in_flight)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    errors = sum(r["errors"] for r in rows)
    first, last = rows[0], rows[-1]
    p99_ratio = last["p99_ms"] / first["p99_ms"]
    common = sorted(set(first["rss_mb"]) & set(last["rss_mb"]))
    growth = {k: last["rss_mb"][k] / first["rss_mb"][k] - 1 for k in common}
    replaced = sorted(set(first["rss_mb"]) ^ set(last["rss_mb"]))
    lines = [f"errors: {errors} ({'met' if errors == 0 else 'MISSED'}: goal 0)",
             f"p99 last/first minute: {p99_ratio:.2f}× ({'met' if p99_ratio <= 1.2 else 'MISSED'}: goal ≤ 1.2×)"]
    worst = max(growth.values(), default=float("nan"))
    lines.append("RSS growth, first to last minute: " + ", ".join(f"{k} {g:+.1%}" for k, g in growth.items())
                 + f" ({'met' if worst < 0.10 else 'MISSED'}: goal < 10%)")
    if replaced:
        lines.append(f"replicas not present in both the first and last minute: {replaced}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint directory (default: --model with a fresh head)")
    ap.add_argument("--model", default="offline:minilm")
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    ap.add_argument("--capacity-s", type=float, default=20.0)
    ap.add_argument("--set", action="append", default=[], help="serve.KEY=VALUE over the defaults")
    args = ap.parse_args()

    import ray

    from distilray.config import load_config
    from distilray.serve.lifecycle import shutdown_server, start_server

    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        args.model, Path(tempfile.mkdtemp(prefix="soak-")) / "ckpt")
    texts = load_texts(REPO.parent / "shared" / "data" / "sst2")
    cfg = load_config(None, [f"serve.port={free_port()}", "serve.app_name=soak", *args.set])
    url = start_server(cfg, str(ckpt)) + "/v1/classify"
    try:
        asyncio.run(closed_loop_rps(url, texts, 32, 10))  # warm-up (and autoscaling to the load)
        capacity = asyncio.run(closed_loop_rps(url, texts, 32, args.capacity_s))
        rate = args.load * capacity
        print(f"checkpoint {ckpt}; capacity {capacity:.1f} requests/s (32 closed-loop clients); "
              f"soak at {rate:.1f}/s ({args.load:.0%}) for {args.minutes} min; Ray {ray.__version__}",
              flush=True)
        rows = asyncio.run(open_loop(url, texts, rate, args.minutes, ReplicaMemory("soak")))
    finally:
        shutdown_server(cfg)
    print("\n| minute | answered | errors | p50 ms | p99 ms | replica RSS MB |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["rss_mb"].items()))
        print(f"| {r['minute']} | {r['answered']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {rss} |")
    print()
    for line in verdicts(rows):
        print(line)


if __name__ == "__main__":
    main()
