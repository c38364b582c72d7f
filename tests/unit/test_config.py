from pathlib import Path

import pytest

from distilray.config import (
    Config,
    apply_overrides,
    dump_config,
    load_config,
)
from distilray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_reference_recipe():
    cfg = Config()
    assert cfg.model.name == "distilbert-base-uncased"
    assert cfg.data.max_length == 128
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (2e-5, 16, 3)
    assert (cfg.train.weight_decay, cfg.train.optimizer, cfg.train.scheduler) == (0.01, "adamw", "linear")


def test_yaml_and_overrides_round_trip(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  name: tiny\ntrain:\n  lr: 5.0e-5\n  epochs: 2\n")
    cfg = load_config(preset, ["train.lr=3e-5", "data.dataset=glue/sst2", "train.use_gpu=true",
                               "train.max_steps=null"])
    assert cfg.model.name == "tiny" and cfg.train.epochs == 2
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.dataset == "glue/sst2" and cfg.train.use_gpu is True
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().train.lr = 1.0  # type: ignore[misc]


def test_apply_overrides_validates():
    cfg = apply_overrides(Config(), {"train.lr": 1e-4, "train.weight_decay": 0.1})
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-4, 0.1)
    with pytest.raises(ConfigError, match=r"train.lr=-1.0 is out of range"):
        apply_overrides(Config(), {"train.lr": -1.0})


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1e-5"], r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"),
    (["trian.lr=1e-5"], r"unknown key 'trian' \(did you mean 'train'\?\)"),
    (["train.lr=fast"], r"train.lr='fast' has the wrong type \(expected float\)"),
    (["train.batch_size=1.5"], r"train.batch_size=1.5 has the wrong type \(expected int\)"),
    (["train.use_gpu=maybe"], r"train.use_gpu='maybe' has the wrong type \(expected bool\)"),
    (["train.lr=0"], r"train.lr=0.0 is out of range \(allowed: > 0.0 and <= 1.0\)"),
    (["train.epochs=0"], r"train.epochs=0 is out of range \(allowed: >= 1\)"),
    (["data.max_length=4096"], r"data.max_length=4096 is out of range \(allowed: >= 8 and <= 512\)"),
    (["data.padding=longest"], r"data.padding='longest' is not allowed \(choose one of: 'dynamic' \| 'max_length'\)"),
    (["model.num_labels=3"], r"model.label_names has 2 names but model.num_labels=3"),
    (["serve.max_ongoing_requests=4"], r"serve.max_ongoing_requests=4 must exceed serve.target_ongoing_requests=8.0"),
    (["serve.max_batch_size=8"], r"serve.target_ongoing_requests=8.0 must be below serve.max_batch_size=8 with serve.coalesce"),
    (["serve.calls_per_replica=3"], r"serve.calls_per_replica=3 is out of range \(allowed: >= 1 and <= 2\)"),
    (["train=3"], r"train must be a mapping of TrainConfig keys"),
    (["lr"], r"override 'lr' must look like section.key=value"),
])
def test_invalid_config_names_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=-1", "train.epochs=0", "data.nope=1"])
    assert len(info.value.problems) == 3


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("preset", sorted(
    [*REPO.glob("configs/*.yaml"), *REPO.glob("tune/*.yaml"), *REPO.glob("distilray/presets/*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_preset_loads(preset):
    load_config(preset)
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# "), f"{preset} should open with a comment giving its command"


def test_unquoted_yaml_no_means_the_option_no(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1: an unquoted `no` is False
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision=True is not allowed"):
        load_config(None, ["train.mixed_precision=yes"])
