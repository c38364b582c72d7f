"""`distilray train` on a real local Ray cluster: accuracy, DDP equivalence, fault tolerance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distilray.config import load_config
from distilray.errors import ClusterError, ConfigError, ModelError
from distilray.train.objective import Classification
from distilray.train.run import read_metrics, run_training

pytestmark = pytest.mark.ray


def tiny_cfg(tmp_path, name, *extra, data=None):
    return load_config(None, [
        "model.name=tiny", "model.dropout=0.0", f"data.dataset={data or 'synthetic:sentiment'}",
        "data.synthetic_size=600", "data.max_length=64", "train.lr=1e-3", "train.epochs=1",
        f"train.storage_path={tmp_path}", f"train.name={name}", "train.log_every_steps=1",
        "train.max_failures=0", *extra])


def train_records(run_dir, event="train"):
    return [r for r in read_metrics(run_dir) if r["event"] == event]


@pytest.mark.slow
def test_sst2_two_workers_reach_85_percent(sst2_run):
    best = sst2_run["best_metrics"]
    assert best["eval_count"] == 872, "every validation sentence is counted exactly once"
    assert best["eval_accuracy"] >= 0.85, best
    workers = train_records(sst2_run["run_dir"], "worker")
    assert {w["rank"] for w in workers} == {0, 1}


def test_ddp_2x8_matches_1x16_and_counts_eval_once(ray_4_cpus, tmp_path):
    one = run_training(tiny_cfg(tmp_path, "one", "train.num_workers=1", "train.batch_size=16"),
                       Classification())
    two = run_training(tiny_cfg(tmp_path, "two", "train.num_workers=2", "train.batch_size=8"),
                       Classification())
    loss1 = [r["loss"] for r in train_records(one["run_dir"])]
    loss2 = [r["loss"] for r in train_records(two["run_dir"])]
    assert len(loss1) == len(loss2) == 540 // 16
    diffs = [abs(a - b) for a, b in zip(loss1, loss2, strict=True)]
    assert max(diffs) < 2e-3, diffs
    assert max(loss1) - min(loss1) > 0.02, "batches differ, so matching step by step means something"
    assert one["final_metrics"]["eval_count"] == two["final_metrics"]["eval_count"] == 60


def test_every_checkpoint_loads_with_transformers_pipeline(ray_4_cpus, tmp_path):
    from transformers import pipeline

    result = run_training(tiny_cfg(tmp_path, "ckpt", "train.epochs=2", "train.eval_every_steps=10",
                                   "train.num_to_keep=10"), Classification())
    checkpoints = sorted(Path(result["run_dir"]).glob("checkpoint-step*"))
    assert [c.name for c in checkpoints] == [f"checkpoint-step{s:07d}" for s in (10, 20, 30, 33, 40, 50, 60, 66)]
    for ckpt in checkpoints:
        assert (ckpt / "model.safetensors").exists() and (ckpt / "training_state.pt").exists()
        clf = pipeline("text-classification", model=str(ckpt))
        out = clf(["a wonderful film", "the plot was dull"])
        assert {o["label"] for o in out} <= {"negative", "positive"}
        meta = json.loads((ckpt / "distilray.json").read_text())
        assert meta["step"] == int(ckpt.name.removeprefix("checkpoint-step"))
    assert Path(result["run_dir"], "result.json").exists() and Path(result["run_dir"], "config.yaml").exists()


def test_bf16_autocast_on_cpu_trains_and_saves_fp32_weights(ray_4_cpus, tmp_path):
    from safetensors.torch import load_file

    fp32 = run_training(tiny_cfg(tmp_path, "fp32", "train.max_steps=6", "train.batch_size=16"),
                        Classification())
    bf16 = run_training(tiny_cfg(tmp_path, "bf16", "train.max_steps=6", "train.batch_size=16",
                                 "train.mixed_precision=bf16"), Classification())
    loss32 = [r["loss"] for r in train_records(fp32["run_dir"])]
    loss16 = [r["loss"] for r in train_records(bf16["run_dir"])]
    assert len(loss32) == len(loss16) == 6
    assert loss32 != loss16, "autocast did not change the arithmetic: bf16 was not used"
    assert max(abs(a - b) for a, b in zip(loss32, loss16, strict=True)) < 0.05  # same run, bf16 rounding
    weights = load_file(str(Path(bf16["best_checkpoint"]) / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}


def test_killed_worker_restarts_from_latest_checkpoint(ray_4_cpus, tmp_path):
    # 3 epochs (99 steps, a checkpoint every 8): rank 1 dies within the first few checkpoints
    # (steps take ~0.05 s, each checkpoint ~2 s), the restart still crosses two epoch ends.
    cfg = tiny_cfg(tmp_path, "kill", "train.num_workers=2", "train.batch_size=8", "train.epochs=3",
                   "train.eval_every_steps=8", "train.max_failures=2")
    run_dir = tmp_path / "kill"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run_training(cfg, Classification())),
                              daemon=True)
    thread.start()
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    killed_at = registered = None
    while time.time() < deadline and killed_at is None:
        # Kill rank 1 a few steps after Ray's controller has registered a checkpoint: one that
        # is only on disk (reported, not yet polled) is not what a restarted group resumes from.
        steps = [r["step"] for r in train_records(run_dir)]
        try:  # Ray rewrites its snapshot in place: a read may catch it empty or half written
            names = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]] \
                if steps and snapshot.exists() else []
        except (ValueError, KeyError, OSError):
            names = []
        if names:
            latest = max((int(n.removeprefix("checkpoint-step")) for n in names), default=0)
            if latest and steps[-1] >= latest + 3:
                victim = next(w for w in train_records(run_dir, "worker") if w["rank"] == 1)
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at, registered = steps[-1], latest
        time.sleep(0.05)
    assert killed_at is not None, "training never reached the kill point"
    thread.join(timeout=300)
    assert not thread.is_alive() and outcome, "run did not finish after the worker was killed"
    records = read_metrics(run_dir)
    restored = [r for r in records if r["event"] == "restored"]
    assert len(restored) == 1
    assert restored[0]["step"] >= registered > 0, (restored, registered)
    assert restored[0]["step"] in {r["step"] for r in records if r["event"] == "eval"}
    after = [r["step"] for r in records[records.index(restored[0]):] if r["event"] == "train"]
    assert after[0] == restored[0]["step"] + 1, "the global step continues from the checkpoint"
    assert after[-1] == outcome["total_steps"] == 3 * (540 // 16)
    assert len({w["pid"] for w in train_records(run_dir, "worker")}) == 4  # a new worker group


def test_killed_driver_rerun_with_same_name_resumes(ray_4_cpus, tmp_path):
    args = [sys.executable, "-m", "distilray", "train", "--config", str(tmp_path / "run.yaml")]
    cfg_text = "\n".join([
        "model: {name: tiny, dropout: 0.0}",
        "data: {dataset: 'synthetic:sentiment', synthetic_size: 600, max_length: 64}",
        f"train: {{lr: 1.0e-3, epochs: 3, batch_size: 16, storage_path: '{tmp_path}', name: resume,"
        " log_every_steps: 1, max_failures: 0}"])
    (tmp_path / "run.yaml").write_text("# distilray train --config run.yaml\n" + cfg_text + "\n")
    env = {**os.environ, "RAY_ADDRESS": ray_4_cpus.get_runtime_context().gcs_address}
    run_dir = tmp_path / "resume"
    driver = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        while time.time() < deadline:  # kill once Ray has registered the epoch-1 checkpoint
            evals = train_records(run_dir, "eval")
            if evals and snapshot.exists() and f"checkpoint-step{evals[0]['step']:07d}" in snapshot.read_text():
                break
            assert driver.poll() is None, "driver exited before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    steps_before_kill = [r["step"] for r in train_records(run_dir)]
    assert steps_before_kill[-1] < 3 * (540 // 16), "the driver was killed before the run ended"
    first_epoch_end = train_records(run_dir, "eval")[0]["step"]
    time.sleep(3)  # let Ray notice the dead driver and tear its actors down
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    records = read_metrics(run_dir)
    restored = [r for r in records if r["event"] == "restored"]
    assert len(restored) == 1 and restored[0]["step"] >= first_epoch_end
    after = records[records.index(restored[0]):]
    assert [r["step"] for r in after if r["event"] == "train"][0] == restored[0]["step"] + 1
    assert all(r["epoch"] > 1 for r in after if r["event"] == "eval"), "epoch 1 was not redone"
    assert [r["step"] for r in after if r["event"] == "eval"][-1] == 3 * (540 // 16)
    assert "best checkpoint" in rerun.stdout


def test_impossible_jobs_fail_fast_with_one_clear_message(ray_4_cpus, tmp_path):
    with pytest.raises(ClusterError, match=r"train.num_workers=4 × train.cpus_per_worker=1.0 needs 4 CPUs "
                                           r"\(\+1 for Ray Data tokenisation\) but the cluster has 4"):
        run_training(tiny_cfg(tmp_path, "big", "train.num_workers=4"), Classification())
    with pytest.raises(ClusterError, match=r"train.use_gpu=true needs 1 GPUs .* the cluster has 0"):
        run_training(tiny_cfg(tmp_path, "gpu", "train.use_gpu=true"), Classification())
    with pytest.raises(ConfigError, match=r"train.storage_path='/proc/distilray' is not writable"):
        run_training(tiny_cfg(tmp_path, "ro", "train.storage_path=/proc/distilray"), Classification())
    with pytest.raises(ModelError, match=r"cannot load model 'nobody/no-such-model'"):
        run_training(tiny_cfg(tmp_path, "nomodel", "model.name=nobody/no-such-model"), Classification())
    out = subprocess.run([sys.executable, "-m", "distilray", "train", "--set", "model.name=tiny",
                          "--set", "data.dataset=/nonexistent/data.parquet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "distilray train: error: /nonexistent/data.parquet: no such file or directory"]


def test_dry_run_checks_without_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distilray", "train", "--config",
                          str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"),
                          "--storage-path", str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dry run OK" in out.stdout and not any(tmp_path.iterdir())


def test_session_processes_ask_their_own_clusters_state_api(ray_4_cpus):
    """Ray Train's PlacementGroupCleaner asks the State API from inside the cluster; beside
    another Ray instance on the host it must still reach this one (else each run's shutdown
    waits out a 12 s timeout), while the driver's own environment stays as it was."""
    import ray.util.state

    @ray_4_cpus.remote(num_cpus=0)
    def own_node_seen_by_state_api() -> tuple[str | None, list[str]]:
        return (os.environ.get("RAY_API_SERVER_ADDRESS"),
                [n.node_id for n in ray.util.state.list_nodes(timeout=10)])

    address, seen = ray_4_cpus.get(own_node_seen_by_state_api.remote())
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    assert address is not None and address.startswith("http://127.0.0.1:")
    assert seen == [ray_4_cpus.get_runtime_context().get_node_id()]
