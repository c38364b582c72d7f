import subprocess
import sys

from distilray.cli import main


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
