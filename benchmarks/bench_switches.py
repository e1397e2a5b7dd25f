"""The winners' switches (docs/winners.md) one at a time against the small-data recipe, on a real-image set.

    .venv/bin/python -m benchmarks.bench_switches --set hpa               # every row, 3 folds, the recipe's epochs
    .venv/bin/python -m benchmarks.bench_switches --set digits --rows base,mixup,crops
    .venv/bin/python -m benchmarks.bench_switches --smoke                 # two rows end to end, in seconds

Each row is ``configs/small_data.yaml`` with the set's data keys (as ``benchmarks.bench_recipes`` builds it) and
one switch turned on; everything else, the seeds and one folds file (``--folds`` splits) are shared, so a row
differs from ``base`` by its switch alone. A row trains every fold (``src.train.train``), then predicts with all
of them (``src.predict.predict``, ``predict.force=true``); the averaging row runs ``src.average`` on each fold
between the two and predicts with ``predict.checkpoint=averaged``. Recorded per row:

- OOF: the cross-fold OOF metric of the threshold strategy predict chose (its report's ``strategies.csv``);
- test: the submission scored against the set's hidden labels (``benchmarks.recipe_sets.set_metric``);
- s/epoch: the training pass of an epoch (validation excluded), the mean over folds of the run's history;
- peak MiB: the row's peak resident memory. Each row runs in a child process (this module with ``--one ROW``,
  started through a launcher of a few MiB so this process's memory is not counted in it) whose own peak is read
  with ``os.wait4``, so one row's memory cannot hide another's; the peak is the largest of the row's process and
  its DataLoader workers, not their sum; the table's header gives the floor under it (a process that only
  imports this module: torch and the libraries, about 1 GiB).
  ``--no-isolate`` runs the rows in this process and reads its peak since the row began (``/proc``'s VmHWM,
  reset per row) instead.

Rows (``--rows``: letters, e.g. ``brm``, or names separated by commas; default every row):

b. base: the recipe as shipped;
r. rare: ``train.sampler=rare``, power 0.5 (WAIR, 2nd place);
m. mixup: half the batches mixed, Beta(0.4, 0.4) (Zhang et al. use alpha 0.1-0.4 on ImageNet);
c. cutmix: half the batches mixed, Beta(1, 1) (Yun et al.'s alpha);
l. lovasz: ``loss.name=0.5*bce+0.5*lovasz`` (bestfitting, 1st place);
h. hard_bce: ``loss.name=0.5*bce+0.5*hard_bce`` (bestfitting's hard-example log loss, as built here);
a. averaging: ``train.keep_epochs=5``, ``src.average`` per fold, ``predict.checkpoint=averaged`` (pudae, 3rd);
x. crops: ``train.augment.crop`` = 3/4 of the image side, whole images at prediction (``predict.crops=0``)
   (bestfitting);
e. extra: a train-only extra source (``data.extra``, ``role: train_only``) of half as many images from the same
   generator with the next seed (bestfitting trained on the external HPAv18 images); the hpa set only.

Writes ``switches_<set>.csv`` and ``switches_<set>.md`` to ``--out`` (after each row, so a long run that stops
keeps the rows it finished; ``--add`` adds rows to the table there, refused unless it was measured with the same
settings, each row recording the command that measured it) and prints the table. W&B is off. ``--threads``
defaults to 2: the benchmark is meant to have the machine to itself.

``--smoke``: 48 train / 12 test images of 32 px, 2 folds, ``test_resnet``, one epoch of batch 8, no TTA, rows
base and rare (unless ``--rows``). Every step end to end, no meaningful figure.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_recipes import (
    SMOKE_OVERRIDES,
    chosen_strategy,
    cpu_precision,
    hidden_labels,
    shared_overrides,
    submitted_matrix,
)
from benchmarks.common import (
    REPO_ROOT,
    add_smoke_option,
    add_threads_option,
    describe_device,
    limit_cpu_threads,
    peak_rss_gib,
    reset_peak_rss,
    work_folder,
)
from benchmarks.real_images import make_real_dataset
from benchmarks.recipe_sets import KINDS, MANY_LABEL, ensure_set, set_metric
from src.average import average
from src.cli import run_cli
from src.config import Config, load_config, override
from src.data import label_matrix
from src.folds import make_folds
from src.formats import load_test_table, load_training_data
from src.predict import degenerate_reasons, predict
from src.run_folder import RunFolder
from src.train import train

RECIPE = REPO_ROOT / "configs" / "small_data.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "switches"
BASE = "base"


@dataclass(frozen=True)
class Switch:
    letter: str
    key: str
    name: str
    overrides: Callable[[int], list[str]]  # the image side (data.image_size) -> the row's config overrides
    average: bool = False  # run src.average on each fold before predicting
    extra: bool = False  # train with a train-only extra source (extra_source): the hpa set only


SWITCHES = [
    Switch("b", BASE, "small-data recipe as shipped", lambda size: []),
    Switch("r", "rare", "rare-class sampler, power 0.5",
           lambda size: ["train.sampler=rare", "train.sampler_power=0.5"]),
    Switch("m", "mixup", "mixup, prob 0.5, alpha 0.4",
           lambda size: ["train.augment.mix=mixup", "train.augment.mix_prob=0.5", "train.augment.mix_alpha=0.4"]),
    Switch("c", "cutmix", "cutmix, prob 0.5, alpha 1.0",
           lambda size: ["train.augment.mix=cutmix", "train.augment.mix_prob=0.5", "train.augment.mix_alpha=1.0"]),
    Switch("l", "lovasz", "0.5*bce+0.5*lovasz", lambda size: ["loss.name=0.5*bce+0.5*lovasz"]),
    Switch("h", "hard_bce", "0.5*bce+0.5*hard_bce", lambda size: ["loss.name=0.5*bce+0.5*hard_bce"]),
    Switch("a", "averaging", "last 5 epochs averaged (src.average)",
           lambda size: ["train.keep_epochs=5", "predict.checkpoint=averaged"], average=True),
    Switch("x", "crops", "random crops of 3/4 the side, whole images predicted",
           lambda size: [f"train.augment.crop={size * 3 // 4}", "predict.crops=0"]),
    Switch("e", "extra", "a train-only extra source of half as many images", lambda size: [], extra=True),
    # folds.group_column and predict.overrides need a set with groups (antibodies) and test images duplicating
    # labelled ones; these sets have neither, so those two are checked by their tests only (docs/winners.md).
]
BY_KEY = {s.key: s for s in SWITCHES} | {s.letter: s for s in SWITCHES}
SMOKE_ROWS = "br"


@dataclass
class Row:
    key: str
    name: str
    oof_metric: float = math.nan  # the chosen strategy's cross-fold OOF figure of the set's metric
    test_metric: float = math.nan
    oof_vs_base: float = math.nan
    test_vs_base: float = math.nan
    seconds_per_epoch: float = math.nan
    peak_mib: float = math.nan
    overrides: str = ""
    notes: list[str] = field(default_factory=list)
    command: str = ""  # the arguments of the run that measured the row
    settings: str = ""  # what rows of one table must share: set, sizes, folds, epochs, backbone, CPU, precision


@dataclass
class Bench:
    """What every row of one run shares: the set, its folds and hidden labels."""
    data_dir: Path
    shared: list[str]  # config overrides every row gets
    test_ids: list[str]
    codes: list[str]
    test_y: np.ndarray
    train_y: np.ndarray
    summary: str


def parse_rows(given: str | None, smoke: bool) -> list[Switch]:
    """``--rows``: names separated by commas, or a string of letters."""
    if not given:
        given = SMOKE_ROWS if smoke else "".join(s.letter for s in SWITCHES)
    tokens = [t.strip() for t in given.split(",")] if "," in given or given in BY_KEY else list(given)
    unknown = [t for t in tokens if t not in BY_KEY]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; expected names of "
                         f"{[s.key for s in SWITCHES]} (comma-separated) or their letters "
                         f"{''.join(s.letter for s in SWITCHES)}")
    chosen = [BY_KEY[t] for t in tokens]
    return [s for s in SWITCHES if s in chosen]  # the table's order, each once


def prepare(args: argparse.Namespace, work_dir: Path) -> Bench:
    """The set (written under the data root once, then reused), the shared folds file (written once per work
    folder) and the hidden test labels."""
    data_root = work_dir / "data" if args.smoke and not args.data_root else Path(args.data_root or REPO_ROOT / "input")
    data_dir = data_root / f"{args.set}{args.image_size}_{args.train_images}_{args.test_images}"
    data_keys = ensure_set(args.set, data_dir, args.train_images, args.test_images, args.image_size, args.data_seed)
    shared = shared_overrides(data_keys, work_dir, args.precision) + run_overrides(args)
    cfg = load_config(RECIPE, shared)
    if not Path(cfg.folds.path).is_file():
        make_folds(cfg, progress=False)
    cfg, train_table, vocabulary = load_training_data(cfg)
    codes = list(vocabulary.codes)
    test_ids = load_test_table(cfg.data)["Id"].tolist()
    summary = (f"{len(train_table)} train / {len(test_ids)} test images of {args.image_size} px ({args.set}, seed "
               f"{args.data_seed}), {len(codes)} classes; {cfg.folds.n_splits} folds, {cfg.train.epochs} epochs, "
               f"{cfg.model.backbone}; {describe_device(torch.device('cpu'))}; precision {args.precision}")
    return Bench(data_dir, shared, test_ids, codes, hidden_labels(args.set, data_dir, cfg, test_ids, codes),
                 label_matrix(train_table["labels"], len(codes)), summary)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The run's size settings on top of the recipe: the smoke run's, the folds, the epochs."""
    extra = [*SMOKE_OVERRIDES, "model.backbone=test_resnet", "predict.tta=[identity]"] if args.smoke else []
    extra.append(f"folds.n_splits={args.folds}")
    if args.epochs:
        extra.append(f"train.epochs={args.epochs}")
    return extra


def extra_source(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """The extra row's source: half as many training images as the set, from the same generator with the next
    seed (other crops of the same photographs, as HPAv18 was more of the same microscopy), written beside the set
    once; its rows train in every fold and are never validated on (``role: train_only``)."""
    if args.set != "hpa":
        raise SystemExit(f"--rows extra: an extra source is built for the hpa set only, not {args.set!r}")
    count = max(args.train_images // 2, 1)
    folder = data_dir.with_name(f"{data_dir.name}_extra{count}_seed{args.data_seed + 1}")
    if not (folder / "train.csv").is_file():
        make_real_dataset(folder, n_train=count, n_test=1, size=args.image_size, seed=args.data_seed + 1,
                          progress=False, id_prefix="extra")
    return [f"data.extra=[{{csv: {folder / 'train.csv'}, images: {folder / 'train'}, role: train_only}}]"]


def row_config(switch: Switch, bench: Bench, args: argparse.Namespace, work_dir: Path) -> Config:
    paths = [f"run.dir={work_dir / 'runs' / switch.key}",
             f"submission.path={work_dir / f'submission_{switch.key}.csv'}"]
    extra = extra_source(args, bench.data_dir) if switch.extra else []
    return load_config(RECIPE, bench.shared + paths + switch.overrides(args.image_size) + extra)


def run_switch(switch: Switch, bench: Bench, args: argparse.Namespace, work_dir: Path) -> Row:
    """Train every fold with the switch, (averaging: average each fold), predict with all folds, score."""
    cfg = row_config(switch, bench, args, work_dir)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)  # a fresh run, also when --work-dir is reused
    overrides = " ".join(switch.overrides(args.image_size))
    print(f"{switch.key}: {overrides or 'as shipped'} ...", flush=True)
    _, score = set_metric(args.set)
    best_epochs = []
    for fold in range(cfg.folds.n_splits):
        result = train(cfg, fold=fold, progress=args.progress)
        best_epochs.append(str(result["best_epoch"]))
        if switch.average:
            average(cfg, fold, progress=args.progress)
    submission = predict(override(cfg, **{"predict.force": True}), progress=args.progress)
    strategy, oof = chosen_strategy(cfg)
    predicted = submitted_matrix(Path(submission), cfg, bench.test_ids, bench.codes)
    folder = RunFolder(cfg.run.dir)
    seconds = [pd.read_csv(folder.history(fold))["seconds"].mean() for fold in range(cfg.folds.n_splits)]
    notes = [f"OOF {strategy}", f"best epochs {'/'.join(best_epochs)} of {cfg.train.epochs}"]
    if degenerate_reasons(predicted, bench.train_y):
        notes.append("degenerate: refused without --force")
    row = Row(switch.key, switch.name, oof, score(bench.test_y, predicted), seconds_per_epoch=float(sum(seconds)
              / len(seconds)), overrides=overrides, notes=notes)
    print(f"  -> OOF {row.oof_metric:.4f}, test {row.test_metric:.4f}, {row.seconds_per_epoch:.1f} s/epoch", flush=True)
    return row


# A small Python process between this (large) one and the row's: a child begins with its parent's memory until it
# execs, and Linux counts that in the child's peak (ru_maxrss), so the row is started from a process of a few MiB.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


def run_isolated(command: list[str], cwd: Path | None = None) -> tuple[int, float]:
    """Run ``command`` as a child process: (its exit status, its peak resident memory in MiB). The peak is
    ``os.wait4``'s for that process alone (the largest of it and its waited-for descendants, e.g. DataLoader
    workers), unlike ``getrusage(RUSAGE_CHILDREN)``, which keeps the largest child so far; it is started from a
    small launcher so that this process's memory does not count in it."""
    with tempfile.TemporaryDirectory(prefix="bench_switches_peak_") as folder:
        peak_file = Path(folder) / "maxrss"
        status = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak_file), *command], cwd=cwd).returncode
        maxrss = int(peak_file.read_text()) if peak_file.is_file() else 0
    return status, maxrss / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def child_command(args: argparse.Namespace, switch: Switch, work_dir: Path, result: Path) -> list[str]:
    """This module run on one row, with this run's settings and work folder."""
    command = [sys.executable, "-m", "benchmarks.bench_switches", "--one", switch.key, "--result", str(result),
               "--work-dir", str(work_dir), "--set", args.set, "--train-images", str(args.train_images),
               "--test-images", str(args.test_images), "--image-size", str(args.image_size),
               "--data-seed", str(args.data_seed), "--folds", str(args.folds), "--threads", str(args.threads),
               "--precision", args.precision]
    command += ["--data-root", str(Path(args.data_root).resolve())] if args.data_root else []
    command += ["--epochs", str(args.epochs)] if args.epochs else []
    return command + ["--smoke"] * args.smoke + ["--progress"] * args.progress


def measured_row(switch: Switch, bench: Bench, args: argparse.Namespace, work_dir: Path) -> Row:
    """One row with its peak memory: in a child process, or (``--no-isolate``) here."""
    if not args.isolate:
        reset_peak_rss()
        row = run_switch(switch, bench, args, work_dir)
        row.peak_mib = peak_rss_gib() * 1024
        row.notes.append("in-process peak")
        return row
    result = work_dir / f"row_{switch.key}.json"
    result.unlink(missing_ok=True)
    status, peak_mib = run_isolated(child_command(args, switch, work_dir, result), cwd=REPO_ROOT)
    if status != 0 or not result.is_file():
        print(f"  -> {switch.key} failed (exit status {status}); see its output above", flush=True)
        return Row(switch.key, switch.name, peak_mib=peak_mib, overrides=" ".join(switch.overrides(args.image_size)),
                   notes=[f"failed: exit status {status}"])
    row = Row(**json.loads(result.read_text()))
    row.peak_mib = peak_mib
    return row


def with_differences(rows: list[Row]) -> list[Row]:
    base = next((r for r in rows if r.key == BASE), None)
    for row in rows:
        if base is not None:
            row.oof_vs_base = row.oof_metric - base.oof_metric
            row.test_vs_base = row.test_metric - base.test_metric
    return rows


def signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.4f}"


def table_lines(rows: list[Row], metric: str) -> list[str]:
    lines = [f"| row | OOF {metric} cross-fold | test {metric} | OOF vs base | test vs base | s/epoch | peak MiB "
             "| notes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.key}: {r.name} | {r.oof_metric:.4f} | {r.test_metric:.4f} | {signed(r.oof_vs_base)} | "
                     f"{signed(r.test_vs_base)} | {r.seconds_per_epoch:.1f} | {r.peak_mib:.0f} | "
                     f"{'; '.join([f'`{r.overrides}`'] * bool(r.overrides) + r.notes)} |")
    return lines


def earlier_rows(out: Path, args: argparse.Namespace, settings: str) -> list[Row]:
    """``--add``: the rows of the set's table in ``out`` that this run does not measure again; refused unless
    they were measured with this run's settings (a row differs from base by its switch alone)."""
    path = out / f"switches_{args.set}.csv"
    if not path.is_file():
        raise SystemExit(f"--add: no earlier table {path} to add rows to")
    frame = pd.read_csv(path)
    if "settings" not in frame or set(frame["settings"]) != {settings}:
        raise SystemExit(f"--add: {path} was measured with other settings than this run's ({settings}): "
                         f"{', '.join(map(str, sorted(set(frame.get('settings', ['(not recorded)'])))))}")
    text = ["overrides", "notes"]  # written empty when a row has none
    frame[text] = frame[text].fillna("")
    again = {s.key for s in args.switches}
    return [Row(**(record | {"notes": [n for n in record["notes"].split("; ") if n]}))
            for record in frame.to_dict("records") if record["key"] not in again]


def in_switch_order(rows: list[Row]) -> list[Row]:
    order = {s.key: i for i, s in enumerate(SWITCHES)}
    return sorted(rows, key=lambda r: order[r.key])


def write_tables(rows: list[Row], out: Path, args: argparse.Namespace, summary: str, metric: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([asdict(r) | {"notes": "; ".join(r.notes)} for r in rows])
    frame.to_csv(out / f"switches_{args.set}.csv", index=False, float_format="%.4f")
    commands = [f"`python -m benchmarks.bench_switches {c}`" for c in dict.fromkeys(r.command for r in rows)]
    header = [f"# Switches on real images: {args.set}", "", "\n\n".join(commands), "",
              summary + ". Each row is the small-data recipe with one switch on; same folds and seeds. OOF: the "
              "chosen threshold strategy's cross-fold figure; s/epoch: training pass only; peak MiB: "
              + ("each row's own process." if args.isolate else "this process since the row began."), ""]
    path = out / f"switches_{args.set}.md"
    path.write_text("\n".join(header + table_lines(rows, metric)) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=[k for k in KINDS if k != MANY_LABEL], default="hpa",
                        help="which real-image set (benchmarks.recipe_sets); the recipe is the few-label one")
    parser.add_argument("--data-root", help="where the sets are written and reused (default: input/; with --smoke, "
                                            "the temp folder)")
    parser.add_argument("--train-images", type=int, default=480)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=3, help="folds.n_splits: every fold is trained and predicted")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the recipe's)")
    parser.add_argument("--rows", help="names separated by commas (base,rare,...) or letters (brmclhaxe); "
                                       "default: every row")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="every row alike; auto: bf16 if the CPU has native bf16 kernels, else fp32")
    add_threads_option(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run the rows in this process (peak memory: this process's since the row began)")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temp folder, removed)")
    parser.add_argument("--out", help="where switches_<set>.csv/.md go (default: benchmarks/results/switches; "
                                      "with --smoke, the temp folder)")
    parser.add_argument("--add", action="store_true",
                        help="add these rows to the set's table in --out (measured with the same settings), keeping "
                             "its other rows: the base row need not be trained again")
    parser.add_argument("--progress", action="store_true", help="show training and prediction progress")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run this row, write it to --result
    parser.add_argument("--result", help=argparse.SUPPRESS)
    add_smoke_option(parser, f"48/12 images of 32 px, 2 folds, test_resnet, one epoch, rows {SMOKE_ROWS}")
    args = parser.parse_args(argv)
    args.argv = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.smoke:
        args.train_images, args.test_images, args.image_size, args.folds, args.epochs = 48, 12, 32, 2, 1
    args.switches = parse_rows(args.rows, args.smoke)
    if not args.rows and args.set != "hpa":  # every row that the set has: the extra source is built for hpa only
        args.switches = [s for s in args.switches if not s.extra]
    args.precision = cpu_precision(args.precision)  # resolved once: the child rows get the same
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    if args.one:  # a child process of an isolated run: the shared set and folds are in --work-dir already
        work_dir = Path(args.work_dir)
        row = run_switch(BY_KEY[args.one], prepare(args, work_dir), args, work_dir)
        Path(args.result).write_text(json.dumps(asdict(row)))
        return [row]
    metric, _ = set_metric(args.set)
    with work_folder(args.work_dir, "bench_switches_") as work_dir:
        work_dir = work_dir.resolve()  # the child processes run from the repository root
        start = time.perf_counter()
        (work_dir / "folds.csv").unlink(missing_ok=True)  # one split per run, of this run's --folds
        bench = prepare(args, work_dir)
        settings = bench.summary  # what a row shares with the table it joins (before the import peak is added)
        print(f"data        {bench.data_dir} ({time.perf_counter() - start:.0f} s); {bench.summary}", flush=True)
        if args.isolate:  # the floor under every row's peak: what its process holds before it trains anything
            _, import_mib = run_isolated([sys.executable, "-c", "import benchmarks.bench_switches"], cwd=REPO_ROOT)
            bench.summary += f"; a process that only imports this benchmark peaks at {import_mib:.0f} MiB"
        out = Path(args.out) if args.out else work_dir / "results" if args.smoke else DEFAULT_OUT
        rows = earlier_rows(out, args, settings) if args.add else []
        for switch in args.switches:
            row = measured_row(switch, bench, args, work_dir)
            row.command, row.settings = args.argv, settings
            rows = in_switch_order([*rows, row])
            path = write_tables(with_differences(rows), out, args, bench.summary, metric)
        print("\n" + "\n".join(table_lines(rows, metric)))
        print(f"wrote {out / f'switches_{args.set}.csv'}, {path}")
    return rows


if __name__ == "__main__":
    run_cli(main)
