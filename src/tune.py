"""Hyperparameter search a team can share: optuna over the ordinary training loop, one fold per trial.

    python -m src.tune --config FILE --space FILE --trials N [--study NAME] [--storage URL] [key=value ...]
    python -m src.tune --config FILE --space FILE --budget 30m [--study NAME] [--storage URL] [key=value ...]
    python -m src.tune --report [--config FILE] [--study NAME] [--storage URL]

The space is YAML, dotted config keys -> distributions (``configs/tune/*.yaml``)::

    train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    train.batch_size: {type: int, low: 16, high: 64, step: 16}
    loss.name: {type: categorical, choices: [bce, bce+soft_f1]}

Every trial is ``train(cfg, tune.fold)`` with its parameters as overrides, in its own run folder
``run.dir/tune/<study>/<trial>``, as a W&B run in the group ``<study>``. After each epoch the monitored
validation score (``train.monitor``; validation loss is minimised, the others maximised) goes to the trial,
and the pruner (``tune.pruner``) may stop it there: the trial is PRUNED, and its console and ``history.csv``
say so. The study lives in an optuna storage (``--storage``, default ``sqlite:///<run.dir>/tune.db``):
any number of tuners on one storage share the work, each taking the next trial, until the study holds
``--trials`` finished trials (complete, pruned, or failed by their own settings: diverged, out of memory).
A tuner killed mid-trial leaves its trial RUNNING; its heartbeat stops, and after ``2 x
tune.heartbeat_seconds`` the next tuner of the study marks it FAIL (it never counts) and runs another.
``--report`` prints the trials, the parameter importances and the best trial's training command, and writes
``run.dir/tune/<study>/report/`` (tables and two plots).

``--budget 30m`` (``90s``, ``1.5h``) runs successive halving over a ladder of fidelities instead (``tune.ladder``:
image size and a share of the epochs per rung, cheapest first): TPE proposes trials at rung 0, the best
1/``tune.eta`` of a rung's complete trials are promoted (their parameters enqueued) to the next rung, and each
rung is a study of its own, ``<study>@rung<r>``, with trial folders ``run.dir/tune/<study>@rung<r>/<trial>``. A
trial starts only when its estimated cost (the mean of its rung's trials so far, else the rung below's scaled by
epochs x pixels) fits the time left; one still running at the deadline is stopped there, PRUNED.
"""

from __future__ import annotations

import gc
import math
import os
import re
import shlex
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import sqlalchemy.exc
import torch
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from src.cli import cli_parser, run_cli
from src.config import Config, ConfigError, PipelineError, flatten, flatten_saved, load_config, override, parse_duration
from src.data import train_sources
from src.files import Staging, ensure_writable
from src.pack import find_cache
from src.progress import note
from src.report import plot_param_importances, plot_tune_history
from src.run_folder import RunFolder, write_history
from src.train import LoopHooks, TrainingDiverged, train

SearchSpace = dict[str, BaseDistribution]

# Keys a space may not search: they decide what the trials are compared on (the objective, the validation
# fold, the data), where the outputs go, or how the search itself runs.
FIXED_KEYS = ("tune", "run", "folds", "metric", "wandb", "predict", "submission", "kaggle", "train.monitor",
              "train.resume", "train.overwrite", "train.device", "data.dir", "data.format", "data.num_classes")
# Base-config keys that may differ between tuners of one study (machine-local, or not about the trials).
MAY_DIFFER = ("run.dir", "wandb", "kaggle", "train.device", "train.num_workers", "data.cache_dir", "predict",
              "submission", "tune.pruner", "tune.n_startup_trials", "tune.n_warmup_steps", "tune.percentile",
              "tune.sampler", "tune.random_trials", "tune.seed", "tune.heartbeat_seconds", "train.resume",
              "train.overwrite")
# A trial that fails by its own settings (diverges, does not fit in memory, an invalid combination) is a result
# of the search: FAIL with its reason, counted towards --trials. Anything else stops the tuner.
TRIAL_FAILURES = (TrainingDiverged, ConfigError, torch.OutOfMemoryError)
FAILURE_ATTR = "failure"
STARTUP_ATTR = "startup_seconds"  # a trial's seconds before its first optimizer step
STORAGE_ATTEMPTS = 4
DISTRIBUTION_FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
                       "categorical": {"choices"}}


# -- the search space ------------------------------------------------------------------------------------
def _number(key: str, spec: dict, field: str, kind: type) -> float | int:
    value = spec.get(field)
    try:
        number = float(value) if isinstance(value, str) else value  # PyYAML reads 1e-4 (no dot) as a string
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError
        if kind is int:
            if float(number) != int(number):
                raise ValueError
            return int(number)
        return float(number)
    except (TypeError, ValueError):
        raise ConfigError(f"search space key '{key}': {field} must be a{'n integer' if kind is int else ' number'}"
                          f", got {value!r}") from None


def _distribution(key: str, spec: Any) -> BaseDistribution:
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTION_FIELDS:
        raise ConfigError(f"search space key '{key}': expected a mapping with type float, int or categorical, "
                          f"got {spec!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - DISTRIBUTION_FIELDS[kind] - {"type"})
    if unknown:
        raise ConfigError(f"search space key '{key}': a {kind} distribution has no field(s) {', '.join(unknown)} "
                          f"(fields: type, {', '.join(sorted(DISTRIBUTION_FIELDS[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space key '{key}': choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"search space key '{key}': choices must be numbers, strings, booleans or null "
                              f"(optuna stores them as such), got {bad[0]!r}")
        return CategoricalDistribution(choices)
    number = int if kind == "int" else float
    low, high = _number(key, spec, "low", number), _number(key, spec, "high", number)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search space key '{key}': log must be true or false, got {log!r}")
    step = _number(key, spec, "step", number) if spec.get("step") is not None else None
    if not low <= high if kind == "int" else not low < high:
        raise ConfigError(f"search space key '{key}': low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"search space key '{key}': log: true needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"search space key '{key}': step must be positive and cannot go with log: true")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(low, high, log=log, step=step)


def candidate_values(distribution: BaseDistribution) -> list:
    """The values that bound a distribution (low and high, or every choice): each must make a valid config."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def parse_space(tree: Any, cfg: Config, source: str = "search space") -> SearchSpace:
    """Validate a space (dotted config key -> distribution spec) against the config schema: an unknown key gets
    the config's "did you mean", a bad distribution or a value the schema refuses names its key."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{source}: expected a mapping of dotted config keys to distributions")
    space: SearchSpace = {}
    for key, spec in tree.items():
        key = str(key)
        if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS):
            raise ConfigError(f"{source}: '{key}' cannot be searched: it decides what trials are compared on, where "
                              "they write or how the search runs (set it in the config or on the command line)")
        try:
            distribution = _distribution(key, spec)
            for value in candidate_values(distribution):
                override(cfg, **{key: value})
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.problems[0]}") from None
        space[key] = distribution
    if cfg.train.monitor == "val_loss" and any(key.startswith("loss.") for key in space):
        raise ConfigError(f"{source}: searches loss settings while train.monitor=val_loss, whose value depends on "
                          "the loss: compare trials by a score (train.monitor=macro_f1_tuned or metric)")
    return space


def load_space(path: str | Path, cfg: Config) -> tuple[SearchSpace, dict]:
    """The search space of a YAML file, validated against ``cfg``; also its raw mapping (saved with the study)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_space(tree, cfg, str(path)), tree


# -- the study -------------------------------------------------------------------------------------------
def monitored_direction(cfg: Config) -> str:
    """The study's direction: the loop's monitored score is validation loss (lower is better) or a score."""
    return "minimize" if cfg.train.monitor == "val_loss" else "maximize"


def epoch_score(row: dict, monitor: str) -> float:
    """An epoch's monitored value from its history row, in the objective's own sign: the validation loss, or
    the score of the weights validation chose (raw or EMA)."""
    return float(row["val_loss"] if monitor == "val_loss" else row[f"{monitor}_{row.get('weights', 'raw')}"])


def storage_url(cfg: Config) -> str:
    """The default storage: ``sqlite:///<run.dir>/tune.db``."""
    return f"sqlite:///{RunFolder(cfg.run.dir).tune_storage}"


def default_storage(cfg: Config) -> str:
    """:func:`storage_url`, its folder proven writable first."""
    ensure_writable(RunFolder(cfg.run.dir).tune_storage.parent, "the tuning study")
    return storage_url(cfg)


def _stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    print(f"trial {trial.number}: marked FAIL: RUNNING with no heartbeat for over {2 * _heartbeat(study)} s "
          "(its tuner was killed); it does not count")


def _heartbeat(study: optuna.Study) -> int:
    return getattr(study._storage, "heartbeat_interval", None) or 0


def _database_error(exc: BaseException) -> sqlalchemy.exc.DBAPIError | None:
    """The database driver's error under ``exc`` (optuna's StorageInternalError wraps sqlalchemy's, which wraps
    the driver's), or None."""
    while exc is not None:
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# What a user can do about the database's own words.
STORAGE_HINTS = {"readonly": "make the file and its folder writable, or pass another --storage",
                 "malformed": "the file is damaged: move it aside (a new study starts) or pass another --storage",
                 "not a database": "the file is not an SQLite database: move it aside or pass another --storage"}


def storage_cause(exc: BaseException) -> str:
    """The database's own words for a storage failure on one line (optuna's message only guesses at them:
    "invalid data in the commit"), without sqlalchemy's SQL and links, and what to do where that is known."""
    found = _database_error(exc)
    text = str(found.orig) if found is not None else re.split(r"\[SQL:|\(Background on this error", str(exc))[0]
    cause = " ".join(text.split())[:300] or type(exc).__name__
    hint = next((f"; {advice}" for key, advice in STORAGE_HINTS.items() if key in cause), "")
    return f"{cause}{hint}"


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A failure of the study's database (opening it, writing trials) as one error naming it and its cause."""
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise PipelineError(f"the tuning storage {url} failed: {storage_cause(exc)}") from None


def open_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
    """The study's database, with a heartbeat per running trial (a killed tuner's trial goes stale)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # wait for the other tuners
    for attempt in range(STORAGE_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_seconds,
                                                  grace_period=2 * heartbeat_seconds,
                                                  heartbeat_stale_trial_callback=_stale_trial)
            except Exception as exc:  # sqlalchemy's errors: a bad URL, a missing driver, an unreachable server
                # Tuners started together on a new database race to create its tables ("table ... already
                # exists", a duplicate schema version): the loser finds them made on a second try. A damaged
                # or read-only file stays so: no second try.
                found = _database_error(exc)
                race = isinstance(found, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError)) and \
                    "readonly" not in str(found.orig)
                if attempt + 1 == STORAGE_ATTEMPTS or not race:
                    raise PipelineError(f"cannot open the tuning storage {url}: {storage_cause(exc)}") from None
        time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def make_sampler(cfg: Config) -> optuna.samplers.BaseSampler:
    tc = cfg.tune
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tc.seed)
    # constant_liar: a trial still running elsewhere counts as a bad result, so parallel tuners spread out.
    return optuna.samplers.TPESampler(n_startup_trials=tc.random_trials, seed=tc.seed, constant_liar=True)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """tune.pruner; one pruning step per epoch (step = epoch number, 1-based)."""
    tc = cfg.tune
    # optuna prunes from step == n_warmup_steps on; "W warm-up epochs" means pruning from epoch W + 1.
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.n_startup_trials, n_warmup_steps=tc.n_warmup_steps + 1)
    if tc.pruner == "percentile":
        return optuna.pruners.PercentilePruner(tc.percentile, n_startup_trials=tc.n_startup_trials,
                                               n_warmup_steps=tc.n_warmup_steps + 1)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _check_same_study(study: optuna.Study, cfg: Config, space_tree: dict) -> None:
    """Refuse to add trials made under another base config or space: the study could not compare them."""
    saved_cfg, saved_space = study.user_attrs.get("base_config"), study.user_attrs.get("space")
    if saved_cfg is not None:
        old, new = flatten_saved(saved_cfg), flatten(cfg.model_dump(mode="json"))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                         and not any(k == p or k.startswith(p + ".") for p in MAY_DIFFER))
        if changed:
            listing = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
            raise PipelineError(f"study '{study.study_name}' was made with a different config ({listing}"
                                f"{', ...' if len(changed) > 6 else ''}): use those settings, or another --study")
    if saved_space is not None and saved_space != space_tree:
        keys = sorted(k for k in set(saved_space) | set(space_tree) if saved_space.get(k) != space_tree.get(k))
        raise PipelineError(f"study '{study.study_name}' was made with a different search space (keys "
                            f"{', '.join(keys)}): use that space, or another --study")


def open_study(cfg: Config, study_name: str, storage: str | None = None, space_tree: dict | None = None,
               command: Sequence[str] = ()) -> optuna.Study:
    """Create study ``study_name`` in ``storage`` (default ``sqlite:///<run.dir>/tune.db``) or join it, after
    checking it was made with the same config and space. ``command`` (config file and overrides) is what the
    report's training command repeats."""
    url = storage or default_storage(cfg)
    study = optuna.create_study(storage=open_storage(url, cfg.tune.heartbeat_seconds), study_name=study_name,
                                direction=monitored_direction(cfg), sampler=make_sampler(cfg),
                                pruner=make_pruner(cfg), load_if_exists=True)
    if study.direction.name.lower() != monitored_direction(cfg):
        raise PipelineError(f"study '{study_name}' in {url} is a {study.direction.name.lower()} study, but "
                            f"train.monitor={cfg.train.monitor} is to {monitored_direction(cfg)}: use another --study")
    if space_tree is not None:
        _check_same_study(study, cfg, space_tree)
        for key, value in (("base_config", cfg.model_dump(mode="json")), ("space", space_tree),
                           ("monitor", cfg.train.monitor), ("fold", cfg.tune.fold), ("command", list(command))):
            if key not in study.user_attrs:  # the first tuner records the study's making; later ones read it
                study.set_user_attr(key, value)
    return study


@dataclass
class TrialCounts:
    results: int  # complete, pruned, or failed by its own settings: what --trials counts
    running: int
    stale_or_broken: int  # FAIL without a result: killed tuners (stale), crashes; never counted


def count_trials(study: optuna.Study) -> TrialCounts:
    trials = study.get_trials(deepcopy=False)
    results = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                  or (t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    broken = sum(t.state == TrialState.FAIL and FAILURE_ATTR not in t.user_attrs for t in trials)
    return TrialCounts(results, running, broken)


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# -- one trial -------------------------------------------------------------------------------------------
class PruningHooks(LoopHooks):
    """Reports each epoch's monitored score to the trial and stops the run when the pruner says so (never after
    the last epoch: a trial that ran every epoch is a result), or at the first step or epoch past ``deadline``
    (``time.monotonic()``: the end of a ``--budget``); keeps the epoch rows, so the trial's history can say why
    it stopped (``stopped``, also set on the hooks)."""

    def __init__(self, trial: optuna.Trial, monitor: str, epochs: int, study_name: str,
                 deadline: float | None = None):
        self.trial, self.monitor, self.epochs, self.study_name, self.rows = trial, monitor, epochs, study_name, []
        self.deadline, self.stopped, self.started = deadline, None, time.monotonic()

    def on_step(self, step: int, metrics: dict) -> bool:
        if step == 1:  # what does not grow with image size and epochs: data, model, loaders (cost estimates)
            self.trial.set_user_attr(STARTUP_ATTR, time.monotonic() - self.started)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._stop(f"stopped at optimizer step {step}, in epoch {len(self.rows) + 1} of {self.epochs}: "
                       "the --budget is spent")
            return True
        return False

    def on_epoch(self, epoch: int, row: dict) -> bool:
        self.rows.append(dict(row))
        score = epoch_score(row, self.monitor)
        self.trial.report(score, step=epoch)
        if epoch < self.epochs and self.trial.should_prune():
            self._stop(f"pruned at epoch {epoch} ({self.monitor} {score:.4f}; trial {self.trial.number} of study "
                       f"'{self.study_name}', {self.trial.study.pruner.__class__.__name__})")
        elif epoch < self.epochs and self.deadline is not None and time.monotonic() >= self.deadline:
            self._stop(f"stopped after epoch {epoch} of {self.epochs} ({self.monitor} {score:.4f}): the --budget "
                       "is spent")
        return self.stopped is not None

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        if self.rows:
            self.rows[-1]["stopped"] = reason


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's value for every key of the space."""
    params = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return params


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={_format_value(value)}" for key, value in params.items())


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def trial_config(cfg: Config, params: dict[str, Any], study_name: str, number: int) -> Config:
    """The trial's config: the base config, the trial's parameters, its own run folder and W&B identity. The
    folder is the trial number's: anything already there is left from a deleted study of the same name."""
    return override(cfg, **params, **{
        "run.dir": str(RunFolder(cfg.run.dir).tune_trial(study_name, number)), "train.resume": False,
        "train.overwrite": True,
        "wandb.group": study_name, "wandb.name": f"{study_name}-trial{number}"})


def make_objective(cfg: Config, space: SearchSpace, study_name: str, progress: bool, ran: list[int],
                   deadline: float | None = None, label: str = "trial"):
    """The study's objective: train ``cfg`` with the trial's parameters, stopped at ``deadline`` if given;
    ``label`` names the trial on the console (``trial``, ``rung 1 trial``)."""
    fold, monitor = cfg.tune.fold, cfg.train.monitor

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        name = f"{label} {trial.number}"
        trial.set_user_attr("tuner", f"{socket.gethostname()}:{os.getpid()}")  # which machine and process ran it
        params = suggest(trial, space)
        print(f"{name}: {format_params(params)}", flush=True)
        hooks = PruningHooks(trial, monitor, cfg.train.epochs, study_name, deadline)
        try:
            trial_cfg = trial_config(cfg, params, study_name, trial.number)
            trial.set_user_attr("run_dir", trial_cfg.run.dir)
            result = train(trial_cfg, fold, progress=progress, hooks=hooks)
        except TRIAL_FAILURES as exc:
            reason = " ".join(str(exc).split())
            trial.set_user_attr(FAILURE_ATTR, reason[:500])
            print(f"{name}: FAIL (counted: a result of its settings): {reason}", flush=True)
            raise
        if hooks.stopped:
            if hooks.rows:  # the loop wrote history.csv before the hooks spoke: write it again with the verdict
                write_history(RunFolder(trial_cfg.run.dir).history(fold), hooks.rows)
            print(f"{name}: PRUNED: {hooks.stopped}", flush=True)
            raise optuna.TrialPruned(hooks.stopped)
        if not math.isfinite(result["best_score"]):
            raise PipelineError(f"{name} finished without a validation score ({result})")
        value = -result["best_score"] if monitor == "val_loss" else result["best_score"]
        print(f"{name}: COMPLETE: {monitor} {value:.4f} (best epoch {result['best_epoch']})", flush=True)
        return value

    return objective


# -- the search ------------------------------------------------------------------------------------------
def _search_setup(cfg: Config, space: SearchSpace, space_tree: dict | None, storage: str | None
                  ) -> tuple[dict, str]:
    """What both kinds of search check and set first: a space to search, optuna quiet, the space as recorded with
    a new study (``space_tree``, else its distributions), and the storage URL."""
    if not space:
        raise PipelineError("the search space is empty")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module prints each trial's outcome itself
    space_tree = space_tree if space_tree is not None else {k: repr(v) for k, v in space.items()}
    return space_tree, storage or default_storage(cfg)


def tune(cfg: Config, space: SearchSpace, trials: int, study: str, storage: str | None = None, *,
         space_tree: dict | None = None, command: Sequence[str] = (), progress: bool = True) -> dict:
    """Run trials of study ``study`` until it holds ``trials`` results (complete, pruned or failed by their own
    settings), sharing the work with any other tuner of the same study and storage; returns the study's
    summary. ``space_tree`` (the space as written) and ``command`` are recorded with a new study."""
    if trials < 1:
        raise PipelineError(f"--trials must be at least 1, got {trials}")
    space_tree, url = _search_setup(cfg, space, space_tree, storage)
    with storage_errors(url):
        opened = open_study(cfg, study, url, space_tree, command)
        fail_stale_trials(opened)
        counts = count_trials(opened)
        print(f"study '{study}' ({url}): {counts.results} of {trials} trials done, {counts.running} running elsewhere"
              + (f", {counts.stale_or_broken} failed without a result (not counted)" if counts.stale_or_broken else "")
              + f"; objective {cfg.train.monitor} ({monitored_direction(cfg)}), fold {cfg.tune.fold}", flush=True)
        ran: list[int] = []
        objective = make_objective(cfg, space, study, progress, ran)
        waiting = False
        while True:
            fail_stale_trials(opened)
            counts = count_trials(opened)
            if counts.results >= trials:
                break
            if counts.results + counts.running >= trials:
                # The last trials are running in other tuners: wait for them, and take over one that goes stale.
                if not waiting:
                    print(f"waiting for {counts.running} trial(s) running in other tuners (a killed one is failed "
                          f"after {2 * cfg.tune.heartbeat_seconds} s and replaced)", flush=True)
                    waiting = True
                time.sleep(min(5, cfg.tune.heartbeat_seconds))
                continue
            waiting = False
            opened.optimize(objective, n_trials=1, catch=TRIAL_FAILURES, gc_after_trial=True)
        return summarize(opened, ran)


def summarize(study: optuna.Study, ran: Sequence[int] = ()) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {"study": study.study_name, "direction": study.direction.name.lower(),
            "monitor": study.user_attrs.get("monitor"), "states": {k: v for k, v in states.items() if v},
            "ran_here": list(ran),
            "best": {"number": best.number, "value": best.value, "params": best.params} if best else None}


# -- the budgeted search: successive halving over a fidelity ladder --------------------------------------
RUNG_SEPARATOR = "@rung"
PROMOTED_ATTR = "promoted_from"  # the number of the trial of the rung below whose parameters a trial repeats
LADDER_KEYS = ("data.image_size", "train.epochs")


@dataclass(frozen=True)
class Rung:
    """One fidelity of the ladder: its trials train at ``image_size`` px for ``epochs`` epochs."""

    image_size: int
    epochs: int

    @property
    def work(self) -> int:
        """What a trial's cost grows with: epochs x pixels."""
        return self.epochs * self.image_size ** 2

    def overrides(self) -> dict[str, int]:
        return {"data.image_size": self.image_size, "train.epochs": self.epochs}

    def __str__(self) -> str:
        return f"{self.image_size} px x {self.epochs} epoch{'s' if self.epochs > 1 else ''}"


def ladder(cfg: Config) -> list[Rung]:
    """The rungs of ``tune.ladder`` (epochs: its share of ``train.epochs``, rounded up, at least 1), each larger
    or longer than the one below; unset: 1/2, 3/4 and all of ``data.image_size`` (multiples of 8, at least
    32 px) with 1/3, 2/3 and all of ``train.epochs``, rungs that come out equal merged."""
    epochs = cfg.train.epochs
    if cfg.tune.ladder:
        # 1e-9: a share written as 0.34 or 1/3 of 30 epochs is 10.2 or 10.000000000000002, not one more epoch
        rungs = [Rung(r.image_size, max(1, math.ceil(r.epochs * epochs - 1e-9))) for r in cfg.tune.ladder]
        for i, (low, high) in enumerate(zip(rungs, rungs[1:]), start=1):
            if high.image_size < low.image_size or high.epochs < low.epochs or high == low:
                raise ConfigError(f"tune.ladder: rung {i} ({high}) must be at least as large and as long as rung "
                                  f"{i - 1} ({low}) and more of one (train.epochs={epochs})")
        return rungs
    size = cfg.data.image_size
    sizes = [min(size, max(32, round(size * share / 8) * 8)) for share in (0.5, 0.75)] + [size]
    rungs = [Rung(s, max(1, -(-epochs * k // 3))) for s, k in zip(sizes, (1, 2, 3))]
    return [rung for i, rung in enumerate(rungs) if i == 0 or rung != rungs[i - 1]]


def rung_study(study: str, rung: int) -> str:
    """The study of rung ``rung`` of the budgeted search ``study``."""
    return f"{study}{RUNG_SEPARATOR}{rung}"


def _complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _seconds(trial: FrozenTrial, scale: float = 1.0) -> float:
    """A trial's seconds, its time after start-up (:data:`STARTUP_ATTR`) multiplied by ``scale``."""
    seconds = trial.duration.total_seconds()
    startup = min(seconds, float(trial.user_attrs.get(STARTUP_ATTR, 0.0)))
    return startup + (seconds - startup) * scale


def rung_costs(trials: Sequence[Sequence[FrozenTrial]], rungs: Sequence[Rung]) -> list[float | None]:
    """The estimated seconds of a trial at each rung: the mean of the rung's complete trials; else of the
    nearest rung below with complete trials, their time after start-up scaled by epochs x pixels; else unknown
    (None)."""
    measured = [[t for t in _complete(rung_trials) if t.duration is not None] for rung_trials in trials]
    costs: list[float | None] = []
    for r in range(len(trials)):
        below = next((q for q in range(r, -1, -1) if measured[q]), None)
        if below is None:
            costs.append(None)
            continue
        scale = rungs[r].work / rungs[below].work
        costs.append(sum(_seconds(t, scale) for t in measured[below]) / len(measured[below]))
    return costs


def next_trial(trials: Sequence[Sequence[FrozenTrial]], rungs: Sequence[Rung], eta: int, left: float,
               maximize: bool, overhead: float = 0.0) -> tuple[int, FrozenTrial | None] | None:
    """What the budgeted search runs next with ``left`` seconds: ``(rung, trial of the rung below to promote)``,
    ``(0, None)`` for a new trial, ``(rung, None)`` for a promotion already enqueued, or None when nothing fits.
    A trial costs :func:`rung_costs` plus ``overhead`` (the tuner's own seconds around a trial).

    Asynchronous successive halving: a complete trial in the best 1/eta of its rung goes up as soon as the rung
    holds enough (top rung first); else a new trial at rung 0, while one more still leaves the cost of a path to
    the top rung; then the best trial of a rung with fewer than eta goes up; then new trials fill what is left."""
    if left <= 0:
        return None
    costs = [None if cost is None else cost + overhead for cost in rung_costs(trials, rungs)]

    def fits(r: int) -> bool:
        return costs[r] is None or costs[r] <= left  # unknown: nothing has finished yet, the deadline guards

    def candidate(r: int, quota: int) -> FrozenTrial | None:
        # A promotion whose tuner was killed (FAIL without a reason of its own) may go up again.
        promoted = {t.user_attrs.get(PROMOTED_ATTR) for t in trials[r]
                    if t.state != TrialState.FAIL or FAILURE_ATTR in t.user_attrs}
        ranked = sorted(_complete(trials[r - 1]), key=lambda t: t.value, reverse=maximize)
        return next((t for t in ranked[:quota] if t.number not in promoted), None)

    top = len(rungs) - 1
    for r in range(top, 0, -1):  # a promotion enqueued by a tuner that stopped before running it
        if fits(r) and any(t.state == TrialState.WAITING for t in trials[r]):
            return r, None
    for r in range(top, 0, -1):
        if fits(r) and (best := candidate(r, len(_complete(trials[r - 1])) // eta)):
            return r, best
    path_to_top = sum(cost for cost in costs[1:] if cost is not None)
    if costs[0] is None or costs[0] + path_to_top <= left:
        return 0, None
    for r in range(top, 0, -1):
        if fits(r) and (best := candidate(r, 1)):
            return r, best
    return (0, None) if fits(0) else None


def note_rung_caches(cfg: Config, rungs: Sequence[Rung], command: Sequence[str]) -> None:
    """With ``data.cache_dir`` set, name the rung sizes it holds no packed cache of: their trials decode the
    image files. Trials find a cache by ``data.cache_dir`` and their image size, so a size packed once serves
    every trial at it."""
    if cfg.data.cache_dir is None:
        return
    missing = sorted({rung.image_size for rung in rungs if any(
        find_cache(override(cfg, **{"data.image_size": rung.image_size}).data, source)[0] is None
        for source in train_sources(cfg.data))})
    if missing:
        packs = "; ".join(shlex.join(["python", "-m", "src.pack", *command, f"data.image_size={size}"])
                          for size in missing)
        note(f"note: {cfg.data.cache_dir} holds no packed cache at {', '.join(map(str, missing))} px: those "
             f"trials decode the image files. To pack each size once for all its trials: {packs}")


def tune_budget(cfg: Config, space: SearchSpace, budget: float, study: str, storage: str | None = None, *,
                space_tree: dict | None = None, command: Sequence[str] = (), progress: bool = True) -> dict:
    """Successive halving over :func:`ladder` for ``budget`` seconds (:func:`next_trial` picks each trial; each
    rung is the study ``<study>@rung<r>`` in ``storage``; a rerun continues the search with a new budget).
    Returns the search's summary: per rung its trials and best, the best top-rung trial, the seconds used."""
    start = time.monotonic()
    deadline = start + budget
    space_tree, url = _search_setup(cfg, space, space_tree, storage)
    if clash := [key for key in space if key in LADDER_KEYS]:
        raise ConfigError(f"search space: {', '.join(clash)} cannot be searched with --budget: the ladder "
                          "(tune.ladder) sets image size and epochs per rung")
    rungs = ladder(cfg)
    base = override(cfg, **{"tune.pruner": "none"})  # the rungs decide which trials go on, not a pruner
    with storage_errors(url):
        if any(s.study_name == study for s in open_storage(url, cfg.tune.heartbeat_seconds).get_all_studies()):
            raise PipelineError(f"'{study}' in {url} is a study of --trials, not a budgeted search: use another "
                                "--study")
        studies = [open_study(base, rung_study(study, r), url, space_tree, command) for r in range(len(rungs))]
        for opened, rung in zip(studies, rungs):  # what the report reads: each rung's size and epochs
            for key, value in rung.overrides().items():
                if key not in opened.user_attrs:
                    opened.set_user_attr(key, value)
        maximize = monitored_direction(cfg) == "maximize"
        print(f"search '{study}' ({url}): budget {budget:.0f} s, successive halving (eta {cfg.tune.eta}) over "
              + ", ".join(f"rung {r} {rung}" for r, rung in enumerate(rungs))
              + f"; objective {cfg.train.monitor} ({monitored_direction(cfg)}), fold {cfg.tune.fold}", flush=True)
        note_rung_caches(cfg, rungs, command)
        ran: list[tuple[int, int]] = []
        overheads: list[float] = []  # this tuner's seconds around each trial (storage, garbage collection)
        while True:
            looked = time.monotonic()
            for opened in studies:
                fail_stale_trials(opened)
            trials = [opened.get_trials(deepcopy=False) for opened in studies]
            step = next_trial(trials, rungs, cfg.tune.eta, deadline - time.monotonic(), maximize,
                              sum(overheads) / len(overheads) if overheads else 0.0)
            if step is None:
                break
            r, promoted = step
            gc.collect()  # what the last trial left (optuna's gc_after_trial, but not after the last one)
            if promoted is not None:
                studies[r].enqueue_trial(promoted.params, user_attrs={PROMOTED_ATTR: promoted.number})
                print(f"rung {r - 1} trial {promoted.number} goes up to rung {r} ({rungs[r]})", flush=True)
            here: list[int] = []
            objective = make_objective(override(base, **rungs[r].overrides()), space, rung_study(study, r), progress,
                                       here, deadline, f"rung {r} trial")
            studies[r].optimize(objective, n_trials=1, catch=TRIAL_FAILURES)
            ran += [(r, number) for number in here]
            for number in here:
                duration = studies[r].get_trials(deepcopy=False)[number].duration
                overheads.append(time.monotonic() - looked - (duration.total_seconds() if duration else 0.0))
    used = time.monotonic() - start
    summary = summarize_ladder(studies, rungs) | {"seconds": used, "budget": budget, "ran_here": ran}
    print(f"search '{study}': {used:.0f} s of the {budget:.0f} s budget; "
          + "; ".join(f"rung {row['rung']}: {row['trials']} trials" for row in summary["rungs"]), flush=True)
    return summary


def summarize_ladder(studies: Sequence[optuna.Study], rungs: Sequence[Rung]) -> dict:
    """Per rung its size, epochs, trials by state and best trial; the best trial of the top rung."""
    rows = []
    for r, (opened, rung) in enumerate(zip(studies, rungs)):
        summary = summarize(opened)
        rows.append({"rung": r, "image_size": rung.image_size, "epochs": rung.epochs,
                     "trials": sum(summary["states"].values()), "states": summary["states"], "best": summary["best"]})
    return {"study": studies[0].study_name.rsplit(RUNG_SEPARATOR, 1)[0], "direction": studies[0].direction.name.lower(),
            "monitor": studies[0].user_attrs.get("monitor"), "rungs": rows, "best": rows[-1]["best"]}


# -- the report ------------------------------------------------------------------------------------------
def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value (complete trials), the last epoch's score, epochs run, params,
    and why a failed trial failed."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        failure = t.user_attrs.get(FAILURE_ATTR, "stale or crashed (not counted)" if t.state == TrialState.FAIL else "")
        rows.append({"number": t.number, "state": t.state.name,
                     "value": t.value if t.state == TrialState.COMPLETE else None,  # (optuna gives pruned ones too)
                     "last_score": t.intermediate_values[steps[-1]] if steps else None, "epochs": len(steps),
                     **t.params, "note": failure, "tuner": t.user_attrs.get("tuner", "")})
    return pd.DataFrame(rows)


def importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Parameter importances (fANOVA, seeded) over the complete trials, or why there are none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError) as exc:
        return {}, f"not computable: {exc}"
    if not found:
        return {}, "no parameter varies across the complete trials"
    return found, f"fANOVA over {len(complete)} complete trials"


def best_command(study: optuna.Study) -> str | None:
    """The best trial as a ready training command: its config file and overrides, a rung's image size and
    epochs where they differ from the config's, then its parameters."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    command = [str(part) for part in study.user_attrs.get("command", [])]
    base = flatten(study.user_attrs.get("base_config", {}))
    rung = {key: study.user_attrs[key] for key in LADDER_KEYS if key in study.user_attrs}
    params = [f"{key}={value}" for key, value in rung.items() if base.get(key) != value]
    params += [f"{key}={_format_value(value)}" for key, value in best.params.items()]
    return shlex.join(["bash", "scripts/train_fold.sh", str(study.user_attrs.get("fold", 0)), *command, *params])


def _search_name(study_name: str) -> str:
    """The search a study belongs to: itself, or the budgeted search of a rung study."""
    return re.sub(rf"{RUNG_SEPARATOR}\d+$", "", study_name)


def pick_study(storage: optuna.storages.BaseStorage, url: str, name: str | None) -> str:
    """The study (or budgeted search: its rung studies under one name) ``name``, or the only one in storage."""
    names = list(dict.fromkeys(_search_name(s.study_name) for s in storage.get_all_studies()))
    if name is not None:
        if name not in names:
            raise PipelineError(f"no study '{name}' in {url} (studies: {', '.join(names) or 'none'})")
        return name
    if len(names) != 1:
        raise PipelineError(f"{url} holds {len(names)} studies ({', '.join(names) or 'none'}): name one with --study")
    return names[0]


def rung_studies(storage: optuna.storages.BaseStorage, search: str) -> list[optuna.Study]:
    """The rung studies of the budgeted search ``search``, rung 0 first (none for an ordinary study)."""
    found = {int(s.study_name.rsplit(RUNG_SEPARATOR, 1)[1]): s.study_name for s in storage.get_all_studies()
             if s.study_name != search and _search_name(s.study_name) == search}
    return [optuna.load_study(study_name=found[r], storage=storage) for r in sorted(found)]


def ladder_report(studies: Sequence[optuna.Study]) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """A budgeted search's summary (:func:`summarize_ladder`), every trial with its rung and the trial it was
    promoted from, and rung 0's table (where the sampler searched: its history plot and importances)."""
    rungs = [Rung(opened.user_attrs["data.image_size"], opened.user_attrs["train.epochs"]) for opened in studies]
    tables = []
    for r, opened in enumerate(studies):
        table = trials_table(opened)
        if len(table):
            table.insert(0, "rung", r)
            table.insert(2, "from", pd.array([t.user_attrs.get(PROMOTED_ATTR) for t in opened.get_trials(
                deepcopy=False)], dtype="Int64"))
            tables.append(table)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["rung", "number", "state"])
    return summarize_ladder(studies, rungs), table, trials_table(studies[0])


def report(cfg: Config, study: str | None = None, storage: str | None = None) -> dict:
    """The study's trials, importances and best training command; writes ``run.dir/tune/<study>/report/``
    (``trials.csv``, ``importances.csv``, ``report.md``, ``optimization_history.png``,
    ``param_importances.png``) and returns what it printed."""
    url = storage or storage_url(cfg)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise PipelineError(f"no tuning storage at {url.removeprefix('sqlite:///')}: run python -m src.tune first "
                            "(or pass --storage)")
    with storage_errors(url):
        rdb = open_storage(url, cfg.tune.heartbeat_seconds)
        name = pick_study(rdb, url, study)
        rungs = rung_studies(rdb, name)
        if rungs:  # a budgeted search: the sampler searched at rung 0, the command is the top rung's best
            summary, table, history = ladder_report(rungs)
            loaded, command = rungs[0], best_command(rungs[-1])
        else:
            loaded = optuna.load_study(study_name=name, storage=rdb)
            summary, table, command = summarize(loaded), trials_table(loaded), best_command(loaded)
            history = table
        found, note = importances(loaded)
        monitor = loaded.user_attrs.get("monitor", cfg.train.monitor)
    minimize = summary["direction"] == "minimize"
    out = RunFolder(cfg.run.dir).tune_report(name)
    text = format_report(summary, table, found, note, command, url, monitor)

    def write(folder: Path) -> None:
        table.to_csv(folder / "trials.csv", index=False)
        pd.DataFrame({"param": list(found), "importance": list(found.values())}).to_csv(
            folder / "importances.csv", index=False)
        plot_tune_history(history, folder / "optimization_history.png", monitor, minimize)
        plot_param_importances(found, folder / "param_importances.png", note)
        (folder / "report.md").write_text(f"```\n{text}\n```\n\n![history](optimization_history.png)\n\n"
                                          "![importances](param_importances.png)\n")

    with Staging() as staging:
        staging.folder(out, write)
        staging.commit()
    return {"text": text, "table": table, "importances": found, "command": command, "dir": str(out), **summary}


def format_report(summary: dict, table: pd.DataFrame, found: dict[str, float], note: str, command: str | None,
                  url: str, monitor: str) -> str:
    """The report's text: the trials, the importances, the best trial's command (a budgeted search: by rung)."""
    if "rungs" in summary:
        return format_ladder_report(summary, table, found, note, command, url, monitor)
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    lines = [f"study '{summary['study']}' ({url}): {len(table)} trials ({states}); objective {monitor} "
             f"({summary['direction']})", ""]
    shown = table.drop(columns=["tuner"] + ([] if table["note"].astype(bool).any() else ["note"]))
    shown = shown.rename(columns={"number": "trial", "last_score": "last epoch"})
    lines.append(shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    lines += ["", "parameter importances (fANOVA over the complete trials; a share of the objective's variance):"]
    lines += [f"  {key:<32} {value:.3f}" for key, value in found.items()] or [f"  none: {note}"]
    if found and summary["states"].get("PRUNED"):
        lines.append("  (pruned trials have no final score and do not enter the importances)")
    lines.append("")
    if command:
        best = summary["best"]
        lines += [f"best: trial {best['number']}, {monitor} {best['value']:.4f}. Train it:", f"  {command}"]
    else:
        lines.append("best: no complete trial yet")
    return "\n".join(lines)


def format_ladder_report(summary: dict, table: pd.DataFrame, found: dict[str, float], note: str,
                         command: str | None, url: str, monitor: str) -> str:
    """A budgeted search's report: the rungs (size, epochs, trials, best), every trial, rung 0's importances,
    and the best top-rung trial's training command."""
    rungs = summary["rungs"]
    lines = [f"search '{summary['study']}' ({url}): successive halving over {len(rungs)} rungs, {len(table)} "
             f"trials; objective {monitor} ({summary['direction']})", ""]
    lines.append(pd.DataFrame([{
        "rung": row["rung"], "image_size": row["image_size"], "epochs": row["epochs"], "trials": row["trials"],
        **{state.lower(): row["states"].get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL")},
        "best": row["best"]["value"] if row["best"] else None,
        "best trial": row["best"]["number"] if row["best"] else None} for row in rungs]).to_string(
        index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    noted = "note" in table and table["note"].astype(bool).any()
    shown = table.drop(columns=["tuner"] + ([] if noted else ["note"]), errors="ignore")
    shown = shown.rename(columns={"number": "trial", "last_score": "last epoch"})
    if "from" in shown:
        shown["from"] = shown["from"].astype("string").fillna("-")
    lines += ["", "trials (from: the trial of the rung below whose parameters it repeats):",
              shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")]
    lines += ["", "parameter importances at rung 0 (fANOVA over its complete trials; a share of the objective's "
              "variance):"]
    lines += [f"  {key:<32} {value:.3f}" for key, value in found.items()] or [f"  none: {note}"]
    lines.append("")
    if command:
        best = summary["best"]
        lines += [f"best at the top rung: trial {best['number']}, {monitor} {best['value']:.4f}. Train it:",
                  f"  {command}"]
    else:
        lines.append(f"best at the top rung: no complete trial yet (rung {len(rungs) - 1})")
    return "\n".join(lines)


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--space", help="YAML search space: dotted config keys -> distributions")
    parser.add_argument("--trials", type=int, help="finished trials the study should hold (a rerun continues)")
    parser.add_argument("--study", help="study name (default: the space file's name; --report: the only study)")
    parser.add_argument("--storage", help="optuna storage URL (default sqlite:///<run.dir>/tune.db)")
    parser.add_argument("--budget", help="a time budget (90s, 30m, 1.5h) instead of --trials: successive halving "
                        "over tune.ladder until it is spent")
    parser.add_argument("--report", action="store_true", help="report the study instead of running trials")
    args = parser.parse_args()
    budget = parse_duration(args.budget, "--budget") if args.budget is not None and not args.report else None
    cfg = load_config(args.config, args.overrides)
    if args.report:
        result = report(cfg, args.study, args.storage)
        print(result["text"])
        print(f"written: {result['dir']}/ (trials.csv, importances.csv, report.md, optimization_history.png, "
              "param_importances.png)")
        return
    if not args.space or (args.trials is None) == (budget is None):
        raise PipelineError("python -m src.tune needs --space FILE and one of --trials N or --budget TIME (or "
                            "--report)")
    space, tree = load_space(args.space, cfg)
    study = args.study or Path(args.space).stem
    command = ["--config", args.config, *(o for o in args.overrides if not o.startswith("tune."))]
    if budget is not None:
        summary = tune_budget(cfg, space, budget, study, args.storage, space_tree=tree, command=command)
        where = f"search '{study}', top rung"
    else:
        summary = tune(cfg, space, args.trials, study, args.storage, space_tree=tree, command=command)
        where = f"study '{study}': {', '.join(f'{n} {s.lower()}' for s, n in summary['states'].items())}"
    best = summary["best"]
    print(f"{where}; " + (f"best trial {best['number']} ({summary['monitor']} {best['value']:.4f}): "
                          f"{format_params(best['params'])}" if best else "no complete trial yet"))
    where = ["--storage", args.storage] if args.storage else []
    print("report: " + shlex.join(["python", "-m", "src.tune", "--report", "--study", study, *where, *command]))


if __name__ == "__main__":
    run_cli(main)
