"""Config as data: every shipped YAML file validates, the schema defaults are the main recipe, overrides are
YAML-typed, and every mistake a user can make (unknown key, wrong type, malformed override, missing file) fails
with a message naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.config import DEFAULT_CONFIG, Config, ConfigError, flatten, load_config
from src.files import save_config
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_every_shipped_config_loads_with_relative_paths_and_its_own_run_folder():
    """Each shipped config validates; what it writes or reads lies under the repo (no machine path), no two
    configs share a run folder (their runs would overwrite each other), and configs that share a folds file make
    it the same way (one dataset's backbones: an ensemble needs their folds to be the same)."""
    assert {path.name for path in CONFIGS} >= {"demo.yaml", "hpa_nasnet512.yaml", "small_data.yaml"}
    loaded = {path.name: load_config(path) for path in CONFIGS}
    for name, cfg in loaded.items():
        paths = [cfg.data.dir, cfg.data.cache_dir, cfg.folds.path, cfg.run.dir, cfg.submission.path, cfg.kaggle.log]
        absolute = [path for path in paths if path is not None and Path(path).is_absolute()]
        assert absolute == [], f"{name}: absolute paths"
    owners = {}
    for name, cfg in loaded.items():
        owners.setdefault(cfg.run.dir, []).append(name)
    assert {value: names for value, names in owners.items() if len(names) > 1} == {}, "shared run.dir"
    makers = {}
    for cfg in loaded.values():
        makers.setdefault(cfg.folds.path, set()).add(yaml.safe_dump([cfg.data.model_dump(), cfg.folds.model_dump()]))
    assert {path: len(ways) for path, ways in makers.items() if len(ways) > 1} == {}, "folds file made two ways"


def test_the_schema_defaults_are_the_main_recipe():
    """``Config()`` is the main config's model and training (pretrained NASNet, EMA, 64 images a step), not a mix
    that no shipped config uses; the data keys describe a dataset and are the main config's to set."""
    main = load_config(REPO_ROOT / DEFAULT_CONFIG)
    for section in ("model", "train", "loss"):
        default, recipe = flatten(getattr(Config(), section).model_dump()), flatten(getattr(main, section).model_dump())
        assert {key: (default[key], recipe[key]) for key in recipe if default[key] != recipe[key]} == {}, section


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_config_validates_and_keeps_its_values(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Every value written in the file reached the validated config (nothing silently dropped).
    written = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump()
    for section, values in written.items():
        for key, value in values.items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    assert dumped[section][key][sub_key] == sub_value, f"{section}.{key}.{sub_key}"
            else:
                assert dumped[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("train.lr=1e-3", "train", "lr", 1e-3),
        ("train.epochs=3", "train", "epochs", 3),
        ("model.pretrained=false", "model", "pretrained", False),
        ("model.pretrained=true", "model", "pretrained", True),
        ("model.pretrained=weights.pth", "model", "pretrained", "weights.pth"),
        ("predict.tta=[identity, rot90]", "predict", "tta", ["identity", "rot90"]),
        ("predict.folds=[0, 2]", "predict", "folds", [0, 2]),
        ("train.clip_grad=null", "train", "clip_grad", None),
    ],
)
def test_override_values_are_typed_by_yaml(override, section, key, expected):
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [override])
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_nested_override_reaches_a_subsection_and_keeps_its_siblings():
    cfg = load_config(REPO_ROOT / "configs" / "hpa_nasnet512.yaml", ["model.modifier.gate_reduction=8"])
    assert cfg.model.modifier.gate_reduction == 8
    assert cfg.model.modifier.feature_dropout == 0.2  # from the YAML, untouched by the override


def test_later_override_wins():
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", ["train.epochs=2", "train.epochs=5"])
    assert cfg.train.epochs == 5


@pytest.mark.parametrize(
    ("override", "unknown", "suggestion"),
    [
        ("train.lrr=1", "train.lrr", "train.lr"),
        ("trian.lr=1", "trian", "train"),
        ("folds.n_split=3", "folds.n_split", "folds.n_splits"),
        ("model.modifer.gate_reduction=2", "model.modifer", "model.modifier"),
    ],
)
def test_unknown_key_names_the_key_and_the_closest_valid_one(override, unknown, suggestion):
    with pytest.raises(ConfigError) as raised:
        load_config(REPO_ROOT / "configs" / "demo.yaml", [override])
    message = str(raised.value)
    assert f"unknown config key '{unknown}'" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_key_in_a_yaml_file_is_caught_too(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"'train\.batch_sise'.*did you mean 'train\.batch_size'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.lr=-1", "train.lr"),  # a constraint, not just a type
        ("train.precision=fp8", "train.precision"),
        ("model.modifier.feature_dropout=1.5", "model.modifier.feature_dropout"),
    ],
)
def test_wrong_value_names_the_key_and_the_value(override, key):
    with pytest.raises(ConfigError) as raised:
        load_config(REPO_ROOT / "configs" / "demo.yaml", [override])
    message = str(raised.value)
    assert f"config key '{key}'" in message
    assert override.split("=", 1)[1] in message  # the offending value is shown


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["train.lrr=1", "train.epochs=abc"])
    assert "train.lrr" in str(raised.value)
    assert "train.epochs" in str(raised.value)


@pytest.mark.parametrize("override", ["train.lr", "=3", ""])
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError, match="not of the form key=value") as raised:
        load_config(REPO_ROOT / "configs" / "demo.yaml", [override])
    assert f"'{override}'" in str(raised.value)


def test_override_below_a_value_is_refused_naming_the_value_key():
    with pytest.raises(ConfigError, match=r"config key 'train\.lr'.*valid number"):
        load_config(REPO_ROOT / "configs" / "demo.yaml", ["train.lr.x=1"])


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as raised:
        load_config(missing)
    assert str(missing) in str(raised.value)


def test_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_save_config_round_trips(path, tmp_path):
    cfg = load_config(path, ["model.pretrained=weights.pth", "train.backbone_lr=1e-5",
                             "data.extra=[{csv: extra.csv, images: extra}]"])
    saved = save_config(cfg, tmp_path / "nested" / "config.yaml")
    assert saved.is_file()
    assert not list(saved.parent.glob("*.tmp"))
    reloaded = load_config(saved)
    assert reloaded == cfg
    assert reloaded.model.pretrained == "weights.pth"
    assert reloaded.data.extra[0].csv == "extra.csv"


def test_cli_reports_unknown_key_in_one_line_without_traceback():
    result = subprocess.run(
        # src.cli parses like every stage (cli_parser, config_from_args, run_cli) without importing torch.
        [sys.executable, "-m", "src.cli", "--config", "configs/demo.yaml", "train.lrr=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert "unknown config key 'train.lrr'" in result.stderr
    assert "did you mean 'train.lr'" in result.stderr
    assert result.stdout == ""


VALIDATE_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["src.cli", "--config", "configs/demo.yaml", "loss.name=bce+soft_fl"]
try:
    runpy.run_module("src.cli", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    print("exit", stop.code)
print("torch" in sys.modules)
"""


def test_an_unknown_loss_name_is_refused_with_the_config_and_without_torch():
    """Not first when training builds the loss: the config check names it, with the closest loss, and needs no
    torch (the losses' names are the config's, src.losses keeps its registry equal to them)."""
    result = subprocess.run([sys.executable, "-c", VALIDATE_WITHOUT_TORCH], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["exit", "2", "False"], result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert "config key 'loss.name': Value error, 'soft_fl' in 'bce+soft_fl' is not a loss (did you mean 'soft_f1'?)" \
        in result.stderr
