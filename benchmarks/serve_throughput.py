"""Serving throughput: a naive FastAPI + pipeline server vs `distilray serve` vs the batched ceiling.

    python benchmarks/serve_throughput.py --model offline:minilm [--checkpoint DIR] \
        [--concurrency 1 8 32] [--requests 300 1200 4800] [--duration 30]

(a) naive: FastAPI + one `transformers.pipeline` call per request (uvicorn, one process);
(b) `distilray serve`: Ray Serve, Ingress (merging concurrent requests into shared calls) + one
    batched Classifier replica using every core;
(b0) `distilray serve` with `serve.coalesce=false` (`--systems n`): as (b), but one
    Classifier call per request;
(b1) `distilray serve` with `serve.topology=single`: one replica that is HTTP front and model
    (one actor hop fewer per request), same cores and batching;
(b2), (b3) (`--systems f`, `g`): (b) and (b1) with `serve.http_fast_path=false`, every request
    through FastAPI's routing;
(c) ceiling: `Predictor` forward passes in-process, one batch of `concurrency` texts at a time;
(d) (`--systems d`): `distilray serve --checkpoint X --detach` exactly as a user starts it, in
    a subprocess with no RAY_ADDRESS: the default config (only the port set, and
    serve.backend unless `--backend auto`, its default) on
    the Ray head the command starts itself; measured after a warm-up under load, so that the
    autoscaler has added the replicas the load asks for.
(b) and (b1) run on a local Ray instance in Serve's high-throughput mode (HAProxy in front,
direct ingress, gRPC between deployments), as `distilray serve` starts it; `--ray-serve-mode
classic` starts Ray's Python proxy instead (Ray's default), for comparison.
Each client sends one SST-2 validation sentence per request, closed loop, over loopback;
each level stops at its request count or after --duration seconds. Same model, same
machine, one invocation; ratios are printed against (a) and (c).

A closed loop fills the server during about one latency at the start of a round and leaves it
part-idle while its last requests drain, so a round only a few latencies long undercounts an
HTTP system's requests/s against (c), which runs full batches back to back. The script warns
when an HTTP round was shorter than `MIN_ROUND_LATENCIES` of its median latency (e.g. IMDb at
concurrency 32 with 200-request rounds: 82% of (c); with 1200-request rounds: 87%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from distilray.runtime import SERVE_HIGH_THROUGHPUT_ENV, use_serve_high_throughput

REPO = Path(__file__).resolve().parents[1]
PORT = 0  # Serve's HTTP port, shared by both topologies' applications; set in main()
NAIVE_SERVER = textwrap.dedent('''
    import os
    from fastapi import FastAPI
    from transformers import pipeline

    app = FastAPI()
    pipe = pipeline("text-classification", model=os.environ["CHECKPOINT"],
                    device=os.environ.get("DEVICE", "cpu"))

    @app.post("/v1/classify")
    def classify(body: dict):
        return {"predictions": [pipe(body["text"], top_k=None)]}
''')


# (b) and its variants: --systems letter, topology, extra overrides, app name (None: topology)
VARIANTS = (("b", "split", [], None), ("s", "single", [], None),
            ("n", "split", ["serve.coalesce=false"], "uncoalesced"),
            ("f", "split", ["serve.http_fast_path=false"], "no-fast-path"),
            ("g", "single", ["serve.http_fast_path=false"], "single-no-fast-path"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_texts(data: Path, n: int = 872) -> list[str]:
    """SST-2 validation sentences (real lengths), IMDb test reviews (a directory with only
    test.parquet: `--data ../shared/data/imdb`), or the synthetic corpus when absent."""
    import pyarrow.parquet as pq

    for split in ("validation", "test"):
        if (data / f"{split}.parquet").exists():
            return pq.read_table(data / f"{split}.parquet").column("text").to_pylist()[:n]
    from distilray.config import DataConfig
    from distilray.data import load_splits

    cfg = DataConfig(dataset="synthetic:sentiment", synthetic_size=2 * n)
    return load_splits(cfg, 2).eval.column("text").to_pylist()[:n]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def make_checkpoint(model: str, out: Path) -> Path:
    """A servable checkpoint of `model` (an untrained head costs the same to run)."""
    from distilray.model import load_classifier, load_tokenizer, resolve_model

    source = resolve_model(model)
    load_classifier(source, ["negative", "positive"]).save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    (out / "distilray.json").write_text(json.dumps({"run_name": "bench", "model_name": model}))
    return out


def add_random_weights(ckpt: Path, seed: int = 0) -> None:
    """Seeded random weights for a checkpoint directory that holds only config and tokenizer.

    For hosts without the pretrained weights (a GPU machine with no Hub access): every system
    runs the same architecture, and a forward pass costs the same whatever the weights' values.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if any(ckpt.glob("*.safetensors")):
        raise SystemExit(f"--random-weights: {ckpt} already has weights; refusing to replace them")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(ckpt))
    model.save_pretrained(ckpt)


MIN_ROUND_LATENCIES = 20
"""An HTTP round shorter than this many median latencies gets a warning (ramp and drain)."""


def short_rounds(row: dict, elapsed: float, rounds: int) -> str | None:
    """A warning when `row`'s rounds were too short for its requests/s to be steady-state."""
    round_s = elapsed / rounds
    if not np.isfinite(row["p50"]) or round_s >= MIN_ROUND_LATENCIES * row["p50"] / 1000:
        return None
    return (f"warning: {row['system']} at concurrency {row['concurrency']}: rounds of "
            f"{round_s:.1f} s are {round_s * 1000 / row['p50']:.0f} median latencies long "
            f"(< {MIN_ROUND_LATENCIES}); filling and draining the closed loop may undercount its "
            f"requests/s by up to ~{row['p50'] / 1000 / round_s:.0%}: raise --requests (and --duration)")


def summarize(name: str, conc: int, latencies: list[float], elapsed: float,
              errors: int) -> dict:
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"system": name, "concurrency": conc, "n": len(latencies), "errors": errors,
            "rps": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99))}


async def http_level(url: str, texts: list[str], conc: int, n: int, duration: float,
                     start_at: float | None = None, offset: int = 0) -> tuple:
    """`conc` closed-loop clients; after a warm-up, wait until wall time `start_at` if given."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(conc):  # warm-up: one request per connection, not measured
            async with session.post(url, json={"text": texts[i % len(texts)]}) as r:
                await r.read()
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal sent, errors
            while sent < n and time.perf_counter() < deadline:
                text = texts[(offset + sent) % len(texts)]
                sent += 1
                t0 = time.perf_counter()
                async with session.post(url, json={"text": text}) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        elapsed = time.perf_counter() - t0
    return latencies, elapsed, errors


def _http_level_in_process(args: tuple) -> tuple:
    return asyncio.run(http_level(*args))


class HttpLoad:
    """The closed-loop HTTP clients of one level, in this process or split over `procs`
    spawned processes: one Python client process tops out near 1k requests/s, which a GPU
    server can pass (on 2 CPUs a second client process would only take the server's cores)."""

    def __init__(self, procs: int = 1):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.procs = procs
        self.pool = None
        if procs > 1:  # spawn: this process holds Ray and maybe CUDA, which fork would copy
            self.pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(time.sleep, [0.0] * procs))  # start them before measuring

    def level(self, url: str, texts: list[str], conc: int, n: int, duration: float) -> tuple:
        if self.pool is None or conc == 1:
            return asyncio.run(http_level(url, texts, conc, n, duration))
        k = min(self.procs, conc)
        start_at = time.time() + 1.0 + 0.02 * conc  # after every process's warm-up
        jobs = [(url, texts, conc // k + (i < conc % k), n // k + (i < n % k), duration,
                 start_at, i * 997) for i in range(k)]
        results = list(self.pool.map(_http_level_in_process, jobs))
        return ([x for r in results for x in r[0]], max(r[1] for r in results),
                sum(r[2] for r in results))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


PROCESS_GROUPS = (("HAProxy", "haproxy"), ("Classifier replica", "Classifier"),
                  ("Ingress replica", "Ingress"), ("Serve controller", "ServeController"),
                  ("naive server", "uvicorn"), ("Ray system", "ray"))


def cpu_seconds_by_group() -> dict[str, float]:
    """CPU seconds (user + system) every live process has used, summed per process group
    (this process = the HTTP clients; Ray actors by their process titles)."""
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    totals: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        group = "HTTP clients (this process)" if int(entry) == me else next(
            (name for name, key in PROCESS_GROUPS if key in cmd), "other")
        totals[group] = totals.get(group, 0.0) + cpu
    return totals


class CpuProfile:
    """Where the CPU time of each system's HTTP levels went, per process group."""

    def __init__(self) -> None:
        self.used: dict[str, dict[str, float]] = {}
        self.wall: dict[str, float] = {}
        self.requests: dict[str, int] = {}

    def wrap(self, key: str, run):
        def measured(*args):
            before, t0 = cpu_seconds_by_group(), time.perf_counter()
            result = run(*args)
            after, wall = cpu_seconds_by_group(), time.perf_counter() - t0
            used = self.used.setdefault(key, {})
            for group, cpu in after.items():
                used[group] = used.get(group, 0.0) + max(0.0, cpu - before.get(group, 0.0))
            self.wall[key] = self.wall.get(key, 0.0) + wall
            self.requests[key] = self.requests.get(key, 0) + len(result[0]) + result[2]
            return result
        return measured

    def report(self, names: dict[str, str]) -> None:
        print(f"\nCPU per request by process group (ms of CPU; {cpu_count()} cores):")
        for key, used in self.used.items():
            n, wall = max(1, self.requests[key]), self.wall[key]
            total = sum(used.values())
            parts = ", ".join(f"{g} {1000 * c / n:.2f} ({c / total:.0%})"
                              for g, c in sorted(used.items(), key=lambda kv: -kv[1]) if c / total >= 0.01)
            print(f"- {names[key]}: {1000 * total / n:.2f} ms/request, machine {total / wall / cpu_count():.0%} "
                  f"busy: {parts}")


def wait_http(url: str, timeout_s: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.post(url, json={"text": "warm up"}, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


def start_naive(ckpt: Path, device: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="naive-server-"))
    (workdir / "naive_server.py").write_text(NAIVE_SERVER)
    env = {**os.environ, "CHECKPOINT": str(ckpt), "DEVICE": device}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "naive_server:app", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            cwd=workdir, env=env)
    url = f"http://127.0.0.1:{port}/v1/classify"
    wait_http(url)
    return url, proc


def start_distilray(ckpt: Path, gpu: bool, extra: list[str], topology: str = "split",
                    name: str | None = None, variants: int = 2):
    """One `distilray serve` app; `variants` of them share this Ray instance (and the GPU)."""
    import ray

    from distilray.config import load_config
    from distilray.serve.lifecycle import start_server

    cores = cpu_count()
    if not ray.is_initialized():  # room for every variant's replicas; one is measured at a time
        ray.init(address="local", num_cpus=(variants + 1) * cores, num_gpus=1 if gpu else 0, include_dashboard=False,
                 log_to_driver=False)
    cfg = load_config(None, [
        f"serve.port={PORT}", "serve.min_replicas=1", "serve.max_replicas=1",
        f"serve.app_name=bench-{name or topology}", f"serve.route_prefix=/{name or topology}",
        f"serve.topology={topology}",
        # the replica may use every core; its reservation leaves room for the 0.1-CPU Ingress
        f"serve.num_cpus={max(1, cores - 1) if gpu else cores - 0.5}",
        f"serve.torch_threads={cores}", f"serve.num_gpus={round(1 / max(2, variants), 3) if gpu else 0}",
        "serve.max_batch_size=32",
        "serve.max_ongoing_requests=64", "serve.target_ongoing_requests=32", *extra])
    url = start_server(cfg, str(ckpt)) + "/v1/classify"
    wait_http(url)
    return url, cfg


class DefaultServer:
    """(d): `distilray serve --detach` in a subprocess, its own Ray head, the default config."""

    def __init__(self, ckpt: Path, backend: str, warmup_s: float, conc: int, texts: list[str],
                 overrides: list[str] | None = None):
        self.state_dir = Path(tempfile.mkdtemp(prefix="serve-defaults-"))
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["DISTILRAY_SERVE_DIR"] = str(self.state_dir)
        for key in SERVE_HIGH_THROUGHPUT_ENV:  # as a user's shell: no benchmark overrides
            self.env.pop(key, None)
        port = free_port()
        extra = [] if backend == "auto" else ["--set", f"serve.backend={backend}"]
        extra += [arg for kv in overrides or [] for arg in ("--set", kv)]
        out = subprocess.run([sys.executable, "-m", "distilray", "serve", "--checkpoint", str(ckpt),
                              "--detach", "--port", str(port), *extra], env=self.env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"distilray serve --detach failed: {out.stderr[-2000:]}")
        self.url = f"http://127.0.0.1:{port}/v1/classify"
        wait_http(self.url)
        asyncio.run(http_level(self.url, texts, conc, 10**9, warmup_s))  # the autoscaler's cue
        self.replicas = self.running_replicas()
        print(f"(d) after {warmup_s:.0f}s of warm-up at concurrency {conc}: {self.replicas}")

    def running_replicas(self) -> dict[str, int]:
        """RUNNING replicas per deployment, asked from the head's own Serve controller."""
        from distilray.cluster import ClusterState

        state = ClusterState.load(self.state_dir)
        if state is None:
            return {"unknown": -1}
        env = {**self.env, **state.client_env()}
        code = ("import json, ray; from ray import serve; ray.init(log_to_driver=False); "
                "app = serve.status().applications['distilray']; print(json.dumps({n: d.replica_states"
                ".get('RUNNING', 0) for n, d in app.deployments.items()}))")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"unknown": -1}

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "distilray", "serve", "--stop"], env=self.env,
                       capture_output=True, text=True, timeout=300)


class Ceiling:
    """(c): `Predictor` forward passes in this process, a batch of `concurrency` texts each."""

    def __init__(self, ckpt: Path, device: str, backend: str = "torch"):
        import torch

        from distilray.serve.predictor import Predictor

        torch.set_num_threads(cpu_count())
        self.device = device
        self.pred = Predictor(str(ckpt), device=device, backend=backend)

    def level(self, texts, conc: int, n: int, duration: float) -> tuple:
        import torch

        self.pred.predict(texts[:conc])  # warm-up
        latencies: list[float] = []
        i = 0
        deadline = time.perf_counter() + duration
        t0 = time.perf_counter()
        while len(latencies) < n and time.perf_counter() < deadline:
            batch = [texts[(i + k) % len(texts)] for k in range(conc)]
            i += conc
            b0 = time.perf_counter()
            self.pred.predict(batch)
            if self.device != "cpu":
                torch.cuda.synchronize()
            latencies += [time.perf_counter() - b0] * conc
        return latencies, time.perf_counter() - t0, 0


def fmt(r: dict) -> str:
    return (f"| {r['system']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {r['n']} | {r['errors']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="offline:minilm")
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of --model's")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[300, 1200, 4800],
                        help="request cap per concurrency level")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds cap per level")
    parser.add_argument("--systems", default="abcs",
                        help="which of a, b, c, s (= b1, topology=single), n (= b0, "
                             "coalesce=false), f (= b2, http_fast_path=false), g (= b3, "
                             "single without the fast path) and d (the defaults) to run")
    parser.add_argument("--warmup", type=float, default=45.0,
                        help="seconds of load on (d) before measuring (autoscaling)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; caps are split across them")
    parser.add_argument("--gpu", action="store_true", help="run model on CUDA in all systems")
    parser.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for (b), e.g. serve.max_batch_size=64")
    parser.add_argument("--defaults-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for (d) (an A/B against the defaults)")
    parser.add_argument("--ray-serve-mode", choices=["high-throughput", "classic"],
                        default="high-throughput",
                        help="how the local Ray instance runs Serve: HAProxy + direct ingress "
                             "(distilray's default) or Ray's Python HTTP proxy")
    parser.add_argument("--backend", choices=["auto", "torch", "onnx", "onnx-int8", "int8"],
                        default="torch",
                        help="model backend of (b), (b1), (c) and (d) (`auto`: serve.backend's "
                             "default); (a) is always the fp32 pipeline")
    parser.add_argument("--random-weights", action="store_true",
                        help="--checkpoint holds config + tokenizer only: give it seeded random "
                             "weights first (same cost per forward pass; no accuracy meaning)")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="split each HTTP level's clients over this many processes (GPU "
                             "servers outrun one Python client; keep 1 on a few CPUs)")
    parser.add_argument("--cpu-profile", action="store_true",
                        help="also print where each HTTP system's CPU time went, per process "
                             "group (clients, HAProxy, Ingress, Classifier, Ray), from /proc")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    global PORT
    PORT = free_port()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.ray_serve_mode == "classic":
        os.environ.update({k: "0" for k in SERVE_HIGH_THROUGHPUT_ENV})
    else:
        use_serve_high_throughput()
    args.serve_set.append(f"serve.backend={args.backend}")  # (b)'s engine is (c)'s

    device = "cuda" if args.gpu else "cpu"
    levels = list(zip(args.concurrency, args.requests, strict=True))
    texts = load_texts(Path(args.data))
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        args.model, Path(tempfile.mkdtemp(prefix="serve-bench-")))
    if args.random_weights:
        if not args.checkpoint:
            parser.error("--random-weights needs --checkpoint (a directory with config.json)")
        add_random_weights(ckpt)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"model {args.checkpoint or args.model} ({ckpt}), {len(texts)} texts, mean {np.mean([len(t) for t in texts]):.0f}"
          f" chars, {cpu_count()} CPUs, device {device}, levels {levels}, cap {args.duration}s, "
          f"Serve mode {args.ray_serve_mode}, backend {args.backend}, client processes "
          f"{args.client_procs}, (b) overrides {args.serve_set or 'none'}, (d) overrides "
          f"{args.defaults_set or 'none'}")
    names = {"c": "(c) in-process batched ceiling", "a": "(a) naive FastAPI + pipeline",
             "b": "(b) distilray serve", "s": "(b1) distilray serve, topology=single",
             "n": "(b0) distilray serve, coalesce=false",
             "f": "(b2) distilray serve, http_fast_path=false",
             "g": "(b3) distilray serve, topology=single, http_fast_path=false",
             "d": "(d) distilray serve --checkpoint X, defaults"}
    runners, cleanup = {}, []
    load = HttpLoad(args.client_procs)
    cleanup.append(load.close)
    # Interleave systems level by level, round after round, so that load from anything else
    # on the machine falls on all three alike; each round gets 1/rounds of the caps.
    pooled: dict = {}
    try:  # servers already started are stopped even when a later one fails to start
        if "c" in args.systems:
            ceiling = Ceiling(ckpt, device, args.backend)
            runners["c"] = ceiling.level
        if "a" in args.systems:
            url_a, proc = start_naive(ckpt, device)
            cleanup.append(lambda: (proc.terminate(), proc.wait(timeout=30)))
            runners["a"] = lambda t, c, n, d, u=url_a: load.level(u, t, c, n, d)
        if "d" in args.systems:
            default = DefaultServer(ckpt, args.backend, args.warmup, max(args.concurrency), texts,
                                    args.defaults_set)
            cleanup.append(default.stop)
            runners["d"] = lambda t, c, n, d, u=default.url: load.level(u, t, c, n, d)
        variants = [v for v in VARIANTS if v[0] in args.systems]
        for key, topology, extra, name in variants:
            url, cfg = start_distilray(ckpt, args.gpu, args.serve_set + extra, topology, name,
                                       variants=len(variants))

            def stop(cfg=cfg):
                from distilray.serve.lifecycle import shutdown_server
                shutdown_server(cfg)
            cleanup.append(stop)
            runners[key] = lambda t, c, n, d, u=url: load.level(u, t, c, n, d)
        profile = CpuProfile() if args.cpu_profile else None
        if profile is not None:
            runners = {k: run if k == "c" else profile.wrap(k, run) for k, run in runners.items()}
        pooled = {(k, c): ([], 0.0, 0) for k in runners for c, _ in levels}
        for _ in range(args.rounds):
            for conc, n in levels:
                for key, run in runners.items():
                    lat, elapsed, errors = run(texts, conc, max(conc, n // args.rounds),
                                               args.duration / args.rounds)
                    old = pooled[(key, conc)]
                    pooled[(key, conc)] = (old[0] + lat, old[1] + elapsed, old[2] + errors)
    finally:
        for stop in cleanup:
            stop()
        import ray

        ray.shutdown()
    keys = [(k, c) for k in runners for c, _ in levels]
    rows = [summarize(names[k], c, *pooled[(k, c)]) for k, c in keys]
    print("\n| system | concurrency | requests/s | p50 ms | p99 ms | requests | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(fmt(r))
    for (k, c), r in zip(keys, rows, strict=True):
        warning = None if k == "c" else short_rounds(r, pooled[(k, c)][1], args.rounds)
        if warning:
            print(warning)
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    by = {(r["system"][:3], r["concurrency"]): r for r in rows}
    print("\n| system | concurrency | vs (a) req/s | p99 / (a) p99 | vs (c) req/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label in ("(b)", "(b0)", "(b1)", "(b2)", "(b3)", "(d)"):
        key = label[:3]  # as `by` is keyed
        for conc, _ in levels:
            a, b, c = by.get(("(a)", conc)), by.get((key, conc)), by.get(("(c)", conc))
            if b is None:
                continue
            ba = f"{b['rps'] / a['rps']:.2f}×" if a else "-"
            pa = f"{b['p99'] / a['p99']:.2f}" if a else "-"
            bc = f"{b['rps'] / c['rps']:.0%}" if c else "-"
            print(f"| {label} | {conc} | {ba} | {pa} | {bc} |")
    if profile is not None:
        profile.report(names)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
