"""The hyperparameter search (src.tune): pruning, tuners sharing one study, a killed tuner, bad spaces.

Every trial is a real tiny training run (test_resnet, 32 px, 2 epochs of 4 steps) on the tiny demo fixture."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import FrozenTrial, create_trial

import src.tune
from src.cli import run_cli
from src.config import ConfigError, PipelineError, load_config, override, parse_duration
from src.files import save_config
from src.run_folder import RunFolder
from src.train import LoopHooks
from src.tune import (
    Rung,
    ladder,
    load_space,
    main,
    next_trial,
    open_storage,
    open_study,
    parse_space,
    report,
    trial_config,
    tune,
    tune_budget,
)
from tests.conftest import REPO_ROOT, tiny_config
from tests.helpers import write_folds

LR_SPACE = {"train.lr": {"type": "float", "low": 1.0e-9, "high": 0.1, "log": True}}


@pytest.fixture
def tune_cfg(tiny_data, tmp_path):
    """The tiny config as a study's base: 2 epochs, validation loss as the objective (minimised), a median
    pruner active from the first finished trial and the first epoch, a 1 s heartbeat."""
    cfg = tiny_config(tiny_data, tmp_path, "train.epochs=2", "train.monitor=val_loss", "train.augment.d4=0",
                      "train.augment.shift_scale_rotate=0", "train.augment.brightness_contrast=0",
                      "train.augment.gamma=0", "tune.n_startup_trials=1", "tune.n_warmup_steps=0",
                      "tune.heartbeat_seconds=1")
    write_folds(cfg, 32)  # fold 0 validates on the last 16 of the 48 images
    return cfg


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tune.db'}"


def start_tuner(cfg, study: str, trials: int, url: str, log: Path, stall: bool = False) -> multiprocessing.Process:
    """A tuner in its own process (forked: the parent's imports come along, so it starts at once), its console
    to ``log``. ``stall``: its trials stop for good after their first epoch is reported (to be killed there)."""
    def run() -> None:
        sys.stdout = sys.stderr = open(log, "w", buffering=1)
        if stall:
            src.tune.train = stalling(src.tune.train)  # this process only
        tune(cfg, parse_space(LR_SPACE, cfg), trials, study, url, space_tree=LR_SPACE, progress=False)

    process = multiprocessing.get_context("fork").Process(target=run)
    process.start()
    return process


@pytest.mark.slow
def test_three_trials_one_pruned_and_the_report(tune_cfg, tmp_path, capsys):
    """A trial whose first epoch is worse than the finished trial's is pruned there: PRUNED in the study, on the
    console and in its history; the report lists every trial and prints the best one's training command."""
    url = storage_url(tmp_path)
    space = parse_space(LR_SPACE, tune_cfg)
    study = open_study(tune_cfg, "lr", url, LR_SPACE, ["--config", "configs/demo.yaml"])
    for lr in (1e-2, 1e-9, 1e-2):  # a learning rate that learns, one that cannot, the first again
        study.enqueue_trial({"train.lr": lr})
    summary = tune(tune_cfg, space, 3, "lr", url, space_tree=LR_SPACE)
    out = capsys.readouterr().out

    assert summary["states"] == {"COMPLETE": 2, "PRUNED": 1}
    trials = optuna.load_study(study_name="lr", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert list(trials[1].intermediate_values) == [1]  # reported epoch 1, stopped there
    assert trials[0].value == pytest.approx(trials[2].value) and trials[0].value < trials[1].intermediate_values[1]
    assert "trial 1: PRUNED: pruned at epoch 1" in out
    folder = RunFolder(tune_cfg.run.dir)
    pruned_history = pd.read_csv(RunFolder(folder.tune_trial("lr", 1)).history(0))
    assert len(pruned_history) == 1 and "pruned at epoch 1" in pruned_history["stopped"].iloc[-1]
    assert len(pd.read_csv(RunFolder(folder.tune_trial("lr", 0)).history(0))) == 2

    result = report(tune_cfg, None, url)  # the only study in the storage
    assert "PRUNED" in result["text"] and "train.lr" in result["text"]
    assert result["command"] == "bash scripts/train_fold.sh 0 --config configs/demo.yaml train.lr=0.01"
    for name in ("trials.csv", "importances.csv", "report.md", "optimization_history.png", "param_importances.png"):
        assert (Path(result["dir"]) / name).is_file(), name


@pytest.mark.slow
def test_two_tuners_share_one_study_without_running_a_trial_twice(tune_cfg, tmp_path):
    """Two processes on one SQLite study take turns: both run trials, every trial is trained by one of them
    once, and together they stop at --trials."""
    cfg, url = override(tune_cfg, **{"tune.pruner": "none", "tune.sampler": "random"}), storage_url(tmp_path)
    logs = [tmp_path / f"tuner{i}.log" for i in range(2)]
    tuners = [start_tuner(cfg, "shared", 4, url, log) for log in logs]
    for tuner in tuners:
        tuner.join(timeout=240)
    assert [tuner.exitcode for tuner in tuners] == [0, 0], [log.read_text()[-2000:] for log in logs]
    trials = optuna.load_study(study_name="shared", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    by = [t.user_attrs["tuner"].rsplit(":", 1)[1] for t in trials]
    assert set(by) == {str(tuner.pid) for tuner in tuners}, by  # both took trials
    for number in range(4):  # each trial folder trained once: one history of 2 epochs
        assert len(pd.read_csv(RunFolder(RunFolder(cfg.run.dir).tune_trial("shared", number)).history(0))) == 2


@pytest.mark.slow
def test_a_killed_tuner_leaves_a_stale_trial_that_is_failed_and_replaced(tune_cfg, tmp_path, capsys):
    """kill -9 mid-trial, then a rerun: once its heartbeat is older than the grace period the killed trial is
    FAIL (not counted), and the study goes on to its --trials results."""
    url, tune_cfg = storage_url(tmp_path), override(tune_cfg, **{"tune.pruner": "none"})
    tuner = start_tuner(tune_cfg, "killed", 2, url, tmp_path / "tuner.log", stall=True)
    deadline = time.monotonic() + 120
    while not ((tuner_trials := _trials_if_any("killed", url)) and tuner_trials[0].intermediate_values) and \
            time.monotonic() < deadline:  # until trial 0 has reported its first epoch (of 2)
        time.sleep(0.1)
    os.kill(tuner.pid, signal.SIGKILL)
    tuner.join(timeout=30)
    trials = optuna.load_study(study_name="killed", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["RUNNING"], tuner_trials

    summary = tune(tune_cfg, parse_space(LR_SPACE, tune_cfg), 2, "killed", url, space_tree=LR_SPACE, progress=False)
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name="killed", storage=url).get_trials()
    assert trials[0].state.name == "FAIL" and "failure" not in trials[0].user_attrs
    assert [t.state.name for t in trials[1:]] == ["COMPLETE", "COMPLETE"]
    assert summary["states"] == {"COMPLETE": 2, "FAIL": 1} and summary["ran_here"] == [1, 2]
    assert "0 of 2 trials done, 1 running elsewhere" in out and "trial 0: marked FAIL" in out


def stalling(train):
    def stalled_train(cfg, fold, progress=True, hooks=None):
        class Stall(LoopHooks):
            def on_epoch(self, epoch: int, row: dict) -> bool:
                hooks.on_epoch(epoch, row)
                time.sleep(600)
                return True

        return train(cfg, fold, progress, Stall())

    return stalled_train


def _trials_if_any(study: str, url: str) -> list:
    try:
        return optuna.load_study(study_name=study, storage=open_storage(url, 1)).get_trials()
    except KeyError:  # not created yet
        return []


def test_a_bad_space_key_is_refused_with_one_line(tune_cfg, tmp_path, monkeypatch, capsys):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("train.lrr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    config_file = tmp_path / "base.yaml"
    save_config(tune_cfg, config_file)
    monkeypatch.setattr(sys, "argv", ["src.tune", "--config", str(config_file), "--space", str(space_file),
                                      "--trials", "2"])
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in err
    assert str(space_file) in err


@pytest.mark.parametrize("space, expected", [
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "'train.lr': low (0.01) must be below high"),
    ({"train.lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}, "'train.lr': log: true needs low > 0"),
    ({"train.lr": {"type": "float", "low": "fast", "high": 1e-2}}, "'train.lr': low must be a number"),
    ({"train.epochs": {"type": "int", "low": 0, "high": 3}}, "config key 'train.epochs': Input should be greater"),
    ({"train.batch_size": {"type": "int", "low": 8, "high": 16.5}}, "'train.batch_size': high must be an integer"),
    ({"train.lr": {"type": "uniform", "low": 1, "high": 2}}, "'train.lr': expected a mapping with type float"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "logg": True}}, "has no field(s) logg"),
    ({"loss.name": {"type": "categorical", "choices": ["bce", "bce+dice"]}}, "'dice' in 'bce+dice' is not a loss"),
    ({"train.monitor": {"type": "categorical", "choices": ["val_loss"]}}, "'train.monitor' cannot be searched"),
    ({"loss.name": {"type": "categorical", "choices": ["bce", "focal"]}}, "train.monitor=val_loss"),
])
def test_a_bad_distribution_names_its_key(tune_cfg, space, expected):
    with pytest.raises(ConfigError) as error:
        parse_space(space, tune_cfg, "space.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_example_spaces_fit_their_configs():
    for space, config in (("hpa", "hpa_nasnet512"), ("small_data", "small_data"), ("many_labels", "openimages_demo")):
        cfg = load_config(REPO_ROOT / "configs" / f"{config}.yaml")
        assert load_space(REPO_ROOT / "configs" / "tune" / f"{space}.yaml", cfg)[0]


def test_a_trial_runs_in_its_own_folder_as_a_wandb_run_of_the_study(tune_cfg):
    trial = trial_config(tune_cfg, {"train.lr": 0.02}, "lr", 7)
    assert trial.train.lr == 0.02 and trial.run.dir == str(RunFolder(tune_cfg.run.dir).tune_trial("lr", 7))
    assert (trial.wandb.group, trial.wandb.name) == ("lr", "lr-trial7")


# -- the budgeted search ---------------------------------------------------------------------------------
BUDGET = 8.0  # seconds: room for a few 24 px trials and a promoted 32 px one (each about a second, and the tuner's)
SLACK = 1.0  # seconds past the deadline: the last trial stops at its next step, writes last.pt, is told PRUNED


@pytest.mark.slow
def test_a_budgeted_search_promotes_the_best_rung0_trials_and_keeps_its_budget(tune_cfg, tmp_path, capsys):
    """Two rungs (24 and 32 px, one epoch), eta 2: rung 1 trains rung-0 parameter sets from the best half of
    rung 0, at its own size, and the search ends within its budget; the report shows both rungs and the best
    top-rung trial's command."""
    cfg = override(tune_cfg, **{"tune.ladder": [{"image_size": 24, "epochs": 1.0}, {"image_size": 32, "epochs": 1.0}],
                                "tune.eta": 2, "train.epochs": 1})
    # On a loaded machine a trial can take several seconds and the budget ends before rung 1: try again with
    # twice the budget (in a fresh study); every attempt must keep its budget.
    for attempt, budget in enumerate((BUDGET, 2 * BUDGET, 4 * BUDGET)):
        (tmp_path / str(attempt)).mkdir()
        cfg = override(cfg, **{"run.dir": str(tmp_path / str(attempt) / "run")})
        url = storage_url(tmp_path / str(attempt))
        open_storage(url, 1)  # an existing storage: its creation (tables, migrations) is not the search's to time
        start = time.monotonic()
        summary = tune_budget(cfg, parse_space(LR_SPACE, cfg), budget, "small", url, space_tree=LR_SPACE,
                              command=["--config", "configs/demo.yaml"], progress=False)
        wall = time.monotonic() - start
        out = capsys.readouterr().out
        assert wall <= budget * 1.1 + SLACK, out
        rung0, rung1 = (optuna.load_study(study_name=f"small@rung{r}", storage=url).get_trials() for r in (0, 1))
        if rung1:
            break
    assert rung0 and rung1, out
    complete0 = sorted((t for t in rung0 if t.state.name == "COMPLETE"), key=lambda t: t.value)  # val_loss: lower
    for trial in rung1:
        source = rung0[trial.user_attrs["promoted_from"]]
        assert trial.params == source.params and source.state.name == "COMPLETE"
        # in the best half of the rung-0 trials complete when it went up (or the best, with fewer than eta)
        done_before = [t for t in complete0 if t.datetime_complete < trial.datetime_start]
        assert source.number in [t.number for t in done_before[:max(1, len(done_before) // 2)]]
    assert len({t.user_attrs["promoted_from"] for t in rung1}) == len(rung1)  # none promoted twice
    for trials, size, epochs in ((rung0, 24, 1), (rung1, 32, 1)):
        trained = load_config(RunFolder(trials[0].user_attrs["run_dir"]).config(0))
        assert (trained.data.image_size, trained.train.epochs) == (size, epochs)
    assert [row["trials"] for row in summary["rungs"]] == [len(rung0), len(rung1)]
    assert f"rung 0 trial {rung1[0].user_attrs['promoted_from']} goes up to rung 1 (32 px x 1 epoch)" in out

    result = report(cfg, None, url)  # the search is the only one in the storage: its two rung studies
    assert "search 'small'" in result["text"] and len(result["table"]) == len(rung0) + len(rung1)
    best = min((t for t in rung1 if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert result["command"] == ("bash scripts/train_fold.sh 0 --config configs/demo.yaml "
                                 f"train.lr={best.params['train.lr']:.6g}")  # the top rung is the config's size


@pytest.mark.slow
def test_a_trial_running_past_the_budget_is_stopped_there_as_pruned(tune_cfg, tmp_path, capsys):
    """One rung of 50 epochs (far longer than the budget): the trial is stopped at the deadline through the loop
    hooks, PRUNED with the reason, and no other trial starts."""
    cfg = override(tune_cfg, **{"train.epochs": 50, "tune.ladder": [{"image_size": 32, "epochs": 1.0}]})
    open_storage(storage_url(tmp_path), 1)
    start = time.monotonic()
    tune_budget(cfg, parse_space(LR_SPACE, cfg), 1.5, "late", storage_url(tmp_path), progress=False)
    assert time.monotonic() - start <= 1.5 * 1.1 + SLACK
    trials = optuna.load_study(study_name="late@rung0", storage=storage_url(tmp_path)).get_trials()
    assert [t.state.name for t in trials] == ["PRUNED"]
    assert "rung 0 trial 0: PRUNED: stopped" in capsys.readouterr().out


def finished(number: int, value: float, seconds: float = 10.0, startup: float = 2.0, **attrs) -> FrozenTrial:
    """A complete trial of ``seconds``, ``startup`` of them before its first step."""
    trial = create_trial(value=value, params={"train.lr": value}, user_attrs={"startup_seconds": startup, **attrs},
                         distributions={"train.lr": optuna.distributions.FloatDistribution(0, 1)})
    trial.number, trial.datetime_start = number, trial.datetime_complete - timedelta(seconds=seconds)
    return trial


def test_successive_halving_promotes_the_best_1_over_eta_and_keeps_a_path_to_the_top():
    """The scheduling rule alone, on made-up trials: 32 px then 64 px (4x the pixels: 2 s of start-up + 4 x 8 s
    = 34 s estimated at rung 1 from 10 s trials at rung 0), eta 2, a score to maximise."""
    rungs = [Rung(32, 1), Rung(64, 1)]
    rung0 = [finished(i, value) for i, value in enumerate([0.1, 0.4, 0.3, 0.2])]
    assert next_trial([rung0, []], rungs, 2, 1000, True) == (1, rung0[1])  # the best goes up first
    rung1 = [finished(0, 0.5, 34, promoted_from=1)]
    assert next_trial([rung0, rung1], rungs, 2, 1000, True) == (1, rung0[2])  # 4 // eta = 2 go up
    rung1.append(finished(1, 0.6, 34, promoted_from=2))
    assert next_trial([rung0, rung1], rungs, 2, 1000, True) == (0, None)  # then new trials at rung 0,
    assert next_trial([rung0[:1], []], rungs, 2, 40, True) == (1, rung0[0])  # unless one would leave no room above
    assert next_trial([rung0, rung1], rungs, 2, 40, True) == (0, None)  # nothing to promote: fill the rest
    assert next_trial([rung0, rung1], rungs, 2, 9, True) is None  # no trial fits what is left
    assert next_trial([[], []], rungs, 2, 5, True) == (0, None)  # nothing measured yet: the deadline guards


def test_the_default_ladder_and_a_ladder_as_data(tune_cfg):
    cfg = override(tune_cfg, **{"data.image_size": 128, "train.epochs": 30})
    assert ladder(cfg) == [Rung(64, 10), Rung(96, 20), Rung(128, 30)]
    assert ladder(override(cfg, **{"data.image_size": 40, "train.epochs": 1})) == [Rung(32, 1), Rung(40, 1)]
    cfg = override(cfg, **{"tune.ladder": [{"image_size": 64, "epochs": 0.34}, {"image_size": 128, "epochs": 1.0}]})
    assert ladder(cfg) == [Rung(64, 11), Rung(128, 30)]  # a share of the epochs, rounded up
    with pytest.raises(ConfigError, match=r"tune.ladder: rung 1 \(64 px x 30 epochs\) must be at least as large"):
        ladder(override(cfg, **{"tune.ladder": [{"image_size": 128, "epochs": 0.5}, {"image_size": 64, "epochs": 1}]}))


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), (" 2M ", 120),
                                           ("8h30m", 30600), ("1h0.5m10s", 3640)])
def test_a_budget_is_a_time_with_its_unit(text, seconds):
    assert parse_duration(text, "--budget") == seconds


@pytest.mark.parametrize("argv", [["--budget", "30"], ["--budget=-5m"], ["--budget", "0s"], ["--budget", "1d"],
                                  ["--budget", "half an hour"], ["--budget", "10m", "--trials", "5"]])
def test_a_bad_budget_is_one_line_and_exit_2(tune_cfg, tmp_path, monkeypatch, capsys, argv):
    space_file, config_file = tmp_path / "space.yaml", tmp_path / "base.yaml"
    space_file.write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    save_config(tune_cfg, config_file)
    monkeypatch.setattr(sys, "argv", ["src.tune", "--config", str(config_file), "--space", str(space_file), *argv])
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--budget" in err), err
    assert not (tmp_path / "run").exists()  # refused before any study or trial


@pytest.fixture(scope="module")
def made_storage(tmp_path_factory) -> Path:
    """A study's SQLite file spanning a few pages, made once (making a storage takes a second)."""
    path = tmp_path_factory.mktemp("storage") / "made.db"
    optuna.create_study(storage=f"sqlite:///{path}", study_name="old").set_user_attr("space", "x" * 9000)
    return path


def damaged_storage(made: Path, path: Path) -> str:
    """The study's file with its second page overwritten: it opens, and fails at the first write."""
    data = bytearray(made.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the page size, from the SQLite header
    data[page:2 * page] = b"\xff" * page
    path.write_bytes(data)
    return f"sqlite:///{path}"


def read_only_storage(made: Path, path: Path) -> str:
    shutil.copy(made, path)
    path.chmod(0o444)
    if os.access(path, os.W_OK):
        pytest.skip("this user (root) can write a read-only file")
    return f"sqlite:///{path}"


@pytest.mark.parametrize("make, cause", [
    (lambda made, path: path.write_bytes(bytes(range(256)) * 16) and f"sqlite:///{path}",
     "file is not a database; the file is not an SQLite database: move it aside or pass another --storage"),
    (damaged_storage, "database disk image is malformed; the file is damaged: move it aside (a new study starts) or "
                      "pass another --storage"),
    (lambda made, path: shutil.copy(made, path) and f"sqlite:///file:{path}?mode=ro&uri=true",  # as a chmod 0444
     "attempt to write a readonly database; make the file and its folder writable, or pass another --storage"),
    (read_only_storage, "attempt to write a readonly database; make the file and its folder writable, or pass "
                        "another --storage"),
])
def test_a_damaged_or_read_only_storage_is_one_line_with_the_databases_cause(tune_cfg, made_storage, tmp_path,
                                                                              make, cause):
    """Not optuna's traceback ending in its guess ("invalid data in the commit, e.g. exceeding max length"): the
    storage and SQLite's own words, before any trial runs."""
    url = make(made_storage, tmp_path / "tune.db")
    with pytest.raises(PipelineError, match="tuning storage") as failure:
        tune(tune_cfg, parse_space(LR_SPACE, tune_cfg), 1, "s", url, progress=False)
    message = str(failure.value)
    assert url in message and message.endswith(cause), message
    assert "\n" not in message and "[SQL" not in message
    assert not RunFolder(tune_cfg.run.dir).tune_trial("s", 0).exists()  # no trial ran
