import subprocess
import sys
from pathlib import Path

import pytest

from distilray.cli import build_parser, flag_values, load_args_config, main
from distilray.config import load_config
from distilray.errors import ConfigError, DataError, RunFailed

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "distilray", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for stage in ("train", "tune", "serve", "distill", "report", "quickstart"):
        assert stage in out


def test_bad_config_is_one_line_and_exit_2(capsys):
    rc = main(["train", "--set", "train.lr=-3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == ("distilray train: error: train.lr=-3.0 is out of range "
                           "(allowed: > 0.0 and <= 1.0)")


def test_version_and_debug_after_the_subcommand(capsys):
    from distilray import __version__

    out = subprocess.run([sys.executable, "-m", "distilray", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"distilray {__version__}"
    with pytest.raises(ConfigError, match=r"train.lr=-3.0 is out of range"):
        main(["train", "--set", "train.lr=-3", "--debug"])  # --debug re-raises instead of exit 2
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--set", "train.lr=-3"])


def test_config_show_prints_the_resolved_config_that_load_config_reads_back(capsys, tmp_path):
    assert main(["config", "show", "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--set", "train.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.train.lr == 3e-4 and cfg == load_config(REPO / "configs" / "tiny.yaml", ["train.lr=3e-4"])


def test_flags_set_their_config_keys_as_typed_values():
    args = build_parser().parse_args(["train", "--name", "2024", "--workers", "3", "--gpu",
                                      "--storage-path", "/tmp/x", "--set", "train.lr=1e-4"])
    assert flag_values("train", args) == {"train.name": "2024", "train.num_workers": 3,
                                          "train.use_gpu": True, "train.storage_path": "/tmp/x"}
    cfg = load_args_config(args)
    assert cfg.train.name == "2024" and cfg.train.num_workers == 3 and cfg.train.lr == 1e-4
    # a switch left off sets nothing: the preset's value stays
    assert "train.use_gpu" not in flag_values("train", build_parser().parse_args(["train"]))


def test_every_stage_that_runs_workers_takes_the_run_flags():
    for command in ("train", "tune", "distill"):
        args = build_parser().parse_args([command, "--workers", "2", "--gpu", "--storage-path", "s",
                                          "--dry-run"])
        assert (args.workers, args.gpu, args.storage_path, args.dry_run) == (2, True, "s", True)
        assert flag_values(command, args)["train.num_workers"] == 2


def test_a_failed_run_exits_1_and_a_bad_input_exits_2(capsys):
    import distilray.cli as cli

    def fails(args):
        raise RunFailed("training run 'x' failed: worker died")

    def bad(args):
        raise DataError("train.parquet: no column 'text'")

    parser = cli.build_parser()
    args = parser.parse_args(["report", "somewhere"])
    args.func = fails
    assert cli.run_command(args) == 1
    args.func = bad
    assert cli.run_command(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["distilray report: error: training run 'x' failed: worker died",
                   "distilray report: error: train.parquet: no column 'text'"]


def test_dry_runs_check_everything_and_leave_nothing_behind(tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--dry-run",
                 "--storage-path", str(storage), "--name", "dry"]) == 0
    assert capsys.readouterr().out.startswith("dry run OK: run 'dry', ")
    assert main(["tune", "--config", str(REPO / "configs" / "tiny.yaml"), "--set",
                 "tune.space={train.lr: {type: choice, values: [0.001, 0.01]}}", "--dry-run",
                 "--storage-path", str(storage), "--name", "dry-search"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run OK: experiment 'dry-search', ") and f"under {storage}/dry-search" in out
    assert not storage.exists(), list(storage.rglob("*"))
