"""Recipes on real images they were never tuned for: the shipped recipes against fastai's and plain baselines.

    .venv/bin/python -m benchmarks.bench_recipes --set hpa      # benchmarks.real_images: HPA layout, 4 channels
    .venv/bin/python -m benchmarks.bench_recipes --set digits   # benchmarks.real_digits: csv layout, handwriting
    .venv/bin/python -m benchmarks.bench_recipes --set digits_many --train-images 1500   # many labels, Open Images
    .venv/bin/python -m benchmarks.bench_recipes --smoke        # every row end to end on a tiny run, in seconds

One run, one dataset, one CPU. The sets (``benchmarks.recipe_sets``, 800 train / 300 test images of 64 px by
default, hidden test labels in ``test_solution.csv``) are written under ``--data-root`` and reused. Folds:
``src.folds.make_folds`` (5 splits). Each config recipe runs the README path on fold 0: ``src.train.train``,
then ``src.predict.predict`` with ``predict.folds=[0]`` and ``predict.force=true`` (whether predict would have
refused the submission as degenerate is recorded with ``src.predict.degenerate_reasons``); its submission is
scored against the hidden labels. Rows (``--rows``, default all):

a. "main config, data keys only": ``configs/hpa_nasnet512.yaml`` with only what a held-out trial changed (data
   keys, paths, ``resnet18`` from scratch, 15 epochs, batch 32, CPU).
b. "small-data recipe": ``configs/small_data.yaml`` with only data keys, paths and ``train.device=cpu``.
o. "small-data recipe, round three": ``benchmarks/configs/small_data_round3.yaml``, the recipe (b) replaced.
f. fastai's own from-scratch recipe (``benchmarks.fastai_peer``: xresnet18 with the data's channels, lr_find
   valley, fit_one_cycle, aug_transforms, BCE, 8-view TTA, a global threshold on the same fold-0 holdout);
   needs ``pip install -r benchmarks/requirements-fastai.txt``; ``--fastai-epochs`` (default 30).
c. pixel logistic regression (one-vs-rest, 32 px, standardised);
d. a plain timm loop (AdamW at a constant 1e-3, BCE, a random D4 view per batch, batch 32) given the wall-clock
   seconds recipe (b)'s training took;
e. the constant prior: every class scored at its training rate.

On the many-label set (``--set digits_many``: Open Images layout, 54 labels) the config rows are
m. "many-label recipe": ``configs/openimages_demo.yaml`` with only data keys and paths;
n. "many-label recipe, round three": ``benchmarks/configs/openimages_round3.yaml``, the recipe (m) replaced;
k. the best constant submission: one label set for every image, grown greedily from the commonest training
   labels while the metric on the training rows improves (default rows: mnk; f, c and e run there too).

Rows are scored by the set's metric on multi-hot matrices over the training vocabulary: macro-F1 (sklearn
``f1_score(average="macro")``), or on the many-label set mean per-image F2 (``fbeta_score(average="samples")``).
"OOF" is fold 0's validation set: for the config recipes the chosen strategy's cross-fold figure
from the prediction report; for fastai its holdout at its global threshold; for the baselines decisions at 0.5.
Test decisions: the recipes' submissions; fastai at its threshold; the baselines at 0.5. W&B is off.

Precision (``--precision``, default ``auto``): bf16 where the CPU has native bf16 kernels, else fp32, set alike
for every row (on an AVX2-only CPU bf16 autocast runs matrix products on a reference GEMM, about 20x slower).

Writes ``recipes_<set>.csv`` and ``recipes_<set>.md`` to ``--out``. ``--threads`` defaults to 2: the benchmark
is meant to have the machine to itself.

``--smoke``: 48 train / 12 test images of 32 px, 2 folds, ``test_resnet``, one epoch of batch 8 (fastai: one
epoch, if installed). Every row end to end, no meaningful figure.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from benchmarks.bench_learning import pixel_logistic_regression
from benchmarks.common import (
    REPO_ROOT,
    add_smoke_option,
    add_threads_option,
    describe_device,
    limit_cpu_threads,
    work_folder,
)
from benchmarks.fastai_peer import fastai_recipe, load_pixels
from benchmarks.recipe_sets import (
    KINDS,
    MANY_LABEL,
    best_constant,
    ensure_set,
    label_sets,
    multi_hot,
    oriented,
    set_metric,
    solution_file,
)
from src.cli import run_cli
from src.config import Config, load_config, override
from src.data import label_matrix
from src.folds import load_folds, make_folds
from src.formats import load_test_table, load_training_data
from src.metrics import decide
from src.model import resolve_precision
from src.predict import degenerate_reasons, predict
from src.train import train

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "recipes"
BENCH_CONFIGS = REPO_ROOT / "benchmarks" / "configs"

# key -> (name, config file, the overrides beyond data keys and paths)
RECIPES = {
    "a": ("main config, data keys only", REPO_ROOT / "configs" / "hpa_nasnet512.yaml", [
        "model.pretrained=false", "train.epochs=15", "train.batch_size=32", "train.num_workers=2"]),
    "b": ("small-data recipe", REPO_ROOT / "configs" / "small_data.yaml", []),
    "o": ("small-data recipe, round three", BENCH_CONFIGS / "small_data_round3.yaml", []),
    "m": ("many-label recipe", REPO_ROOT / "configs" / "openimages_demo.yaml", []),
    "n": ("many-label recipe, round three", BENCH_CONFIGS / "openimages_round3.yaml", []),
}
ROWS = "aboefcdmnk"
VARIED_ROWS = "bm"  # the shipped recipes, which --recipe-overrides varies
MANY_LABEL_ROWS = "mnk"  # the rows of the many-label set (its own layout and metric); the others' rows elsewhere
# The tiny run of --smoke: the sizes of tests/conftest.py's tiny config.
SMOKE_OVERRIDES = ["folds.n_splits=2", "folds.rare_classes=warn", "train.epochs=1", "train.batch_size=8",
                   "train.num_workers=0"]


@dataclass
class Row:
    name: str
    oof_metric: float  # the set's metric (set_metric): macro-F1, or per-image F2 on the many-label set
    test_metric: float
    train_minutes: float
    notes: str
    degenerate: str = ""  # why predict would refuse this row's test decisions without --force ("" if it would not)


def scored_row(name: str, oof_metric: float, test_y: np.ndarray, test_predicted: np.ndarray,
               train_y: np.ndarray, train_minutes: float, score, *notes: str) -> Row:
    """A table row (test decisions scored by ``score``); decisions that predict would refuse as degenerate are
    flagged in its notes."""
    reasons = "; ".join(degenerate_reasons(test_predicted, train_y))
    notes += ("degenerate: refused without --force",) if reasons else ()
    return Row(name, oof_metric, score(test_y, test_predicted), train_minutes,
               "; ".join(note for note in notes if note), reasons)


def run_recipe(name: str, cfg: Config, test_ids: list[str], codes: list[str], train_y: np.ndarray,
               test_y: np.ndarray, score, progress: bool) -> tuple[Row, float]:
    """The README path on fold 0 of ``cfg`` (train, predict with that fold alone), its submission scored;
    (row, training seconds)."""
    shutil.rmtree(cfg.run.dir, ignore_errors=True)  # a fresh run, also when --work-dir is reused
    print(f"{name}: {cfg.model.backbone}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size} x "
          f"{cfg.train.accum_steps}, lr {cfg.train.lr}, loss {cfg.loss.name}, ema {cfg.train.ema}, "
          f"{len(cfg.predict.tta)} TTA views ...", flush=True)
    start = time.perf_counter()
    result = train(cfg, fold=0, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    submission = predict(override(cfg, **{"predict.folds": [0], "predict.force": True}), progress=progress)
    predict_seconds = time.perf_counter() - start
    strategy, cross_fold = chosen_strategy(cfg)
    predicted = submitted_matrix(Path(submission), cfg, test_ids, codes)
    row = scored_row(name, cross_fold, test_y, predicted, train_y, train_seconds / 60, score,
                     f"OOF {strategy}",
                     f"best epoch {result['best_epoch']}/{cfg.train.epochs} ({result.get('best_weights', 'raw')})",
                     f"{result['steps']} steps", f"predict {predict_seconds:.0f} s")
    print(f"  -> test {row.test_metric:.4f}, training {train_seconds:.0f} s", flush=True)
    return row, train_seconds


def chosen_strategy(cfg: Config) -> tuple[str, float]:
    """(name, cross-fold OOF metric) of the threshold strategy the last prediction of ``cfg``'s run chose, from
    its report."""
    strategies = pd.read_csv(Path(cfg.run.dir) / "report" / "strategies.csv", keep_default_na=False)
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]
    return str(chosen["strategy"]), float(chosen.filter(like="cross_fold").iloc[0])


def submitted_matrix(submission: Path, cfg: Config, test_ids: list[str], codes: list[str]) -> np.ndarray:
    """A submission as a multi-hot matrix over ``codes``, its rows in the order of ``test_ids``."""
    submitted = label_sets(submission, cfg.data)
    return multi_hot([submitted[i] for i in test_ids], codes)


def hidden_labels(kind: str, data_dir: Path, cfg: Config, test_ids: list[str], codes: list[str]) -> np.ndarray:
    """The set's hidden test labels as a multi-hot matrix over ``codes``, its rows in the order of ``test_ids``."""
    truth = label_sets(solution_file(kind, data_dir), cfg.data, solution=kind != MANY_LABEL)
    return multi_hot([truth[i] for i in test_ids], codes)


def cpu_precision(choice: str) -> str:
    """``--precision``: auto is what ``train.precision: auto`` picks on this CPU (bf16 where it has native bf16
    kernels, else fp32)."""
    return choice if choice != "auto" else resolve_precision(torch.device("cpu"), "auto").name


def shared_overrides(data_keys: list[str], work_dir: Path, precision: str) -> list[str]:
    """What every config row of a run shares: the set's data keys, one folds file, the CPU, W&B off."""
    return data_keys + [f"folds.path={work_dir / 'folds.csv'}", "train.device=cpu", f"train.precision={precision}",
                        "wandb.mode=disabled", "data.cache_dir=null"]


def plain_timm_loop(train_x: torch.Tensor, train_y: np.ndarray, normalise, seconds: float, backbone: str,
                    batch_size: int, lr: float, seed: int, bf16: bool) -> tuple[torch.nn.Module, int, int, float]:
    """A timm model trained the plain way until ``seconds`` have passed (at least one step): (the model in
    eval mode, optimizer steps, epochs begun, seconds taken)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = timm.create_model(backbone, in_chans=train_x.shape[1], num_classes=train_y.shape[1], pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    targets = torch.from_numpy(train_y).float()
    model.train()
    steps, epochs, start = 0, 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        epochs += 1
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            if len(index) < batch_size or (steps and time.perf_counter() - start >= seconds):
                continue  # drop the short last batch (BatchNorm); stop when the time is up
            images = normalise(train_x[index])
            if torch.rand(1, generator=generator) < 0.5:  # a random D4 view per batch: the labels are invariant
                images = images.flip(-1)
            images = torch.rot90(images, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(images)
            loss = loss_fn(logits.float(), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    return model.eval(), steps, epochs, time.perf_counter() - start


def channel_normaliser(images: torch.Tensor):
    """uint8 images -> float, standardised per channel with the statistics of ``images``."""
    mean = images.float().mean(dim=(0, 2, 3), keepdim=True)
    std = images.float().std(dim=(0, 2, 3), keepdim=True)
    return lambda batch: (batch.float() - mean) / std


@torch.no_grad()
def plain_probs(model: torch.nn.Module, images: torch.Tensor, normalise, bf16: bool, batch_size: int = 64
                ) -> np.ndarray:
    outputs = []
    for batch in images.split(batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs.append(torch.sigmoid(model(normalise(batch)).float()))
    return torch.cat(outputs).numpy()


def print_table(rows: list[Row], metric: str) -> None:
    width, column = max(len(r.name) for r in rows) + 2, len(metric) + 7
    print(f"\n{'predictor':<{width}}{'OOF ' + metric:>{column}}{'test ' + metric:>{column}}{'train min':>11}  notes")
    for r in rows:
        print(f"{r.name:<{width}}{r.oof_metric:>{column}.4f}{r.test_metric:>{column}.4f}{r.train_minutes:>11.2f}  "
              f"{r.notes}")


def markdown(rows: list[Row], header: str, comparisons: list[str], metric: str) -> str:
    lines = [header, "", f"| predictor | OOF {metric} (fold 0) | test {metric} | train minutes | notes |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.oof_metric:.4f} | {r.test_metric:.4f} | {r.train_minutes:.2f} | {r.notes} |"
              for r in rows]
    return "\n".join(lines + [""] + [f"- {c}" for c in comparisons]) + "\n"


def compare(recipe: Row, baseline: Row, metric: str) -> str:
    ratio = recipe.test_metric / baseline.test_metric if baseline.test_metric > 0 else float("inf")
    return (f"{recipe.name} vs {baseline.name}: test {metric} {recipe.test_metric:.4f} vs "
            f"{baseline.test_metric:.4f} (difference {recipe.test_metric - baseline.test_metric:+.4f}, "
            f"ratio {ratio:.2f}); OOF {recipe.oof_metric:.4f} vs {baseline.oof_metric:.4f}")


def fastai_available() -> bool:
    try:
        import fastai  # noqa: F401
    except ImportError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=KINDS, default="hpa", help="which real-image set (benchmarks.recipe_sets)")
    parser.add_argument("--data-root", default=str(REPO_ROOT / "input"),
                        help="where the sets are written and reused (<root>/<set><size>_<train>_<test>)")
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--rows", help=f"which rows, as their letters of {ROWS} (default: every row of the set: "
                                       f"{MANY_LABEL_ROWS} on {MANY_LABEL}, the others elsewhere)")
    parser.add_argument("--backbone", default="resnet18", help="recipe (a) and the plain loop")
    parser.add_argument("--fastai-epochs", type=int, default=30, help="fastai's fit_one_cycle epochs")
    parser.add_argument("--fastai-batch-size", type=int, default=64, help="fastai's batch size (its default)")
    parser.add_argument("--pixel-size", type=int, default=32, help="logistic regression: downsampled side")
    parser.add_argument("--lr-c", type=float, default=0.01, help="logistic regression: inverse L2 strength")
    parser.add_argument("--plain-lr", type=float, default=1e-3, help="plain timm loop: AdamW learning rate")
    parser.add_argument("--plain-batch-size", type=int, default=32)
    parser.add_argument("--plain-seconds", type=float,
                        help="plain timm loop: training seconds (default: what recipe (b)'s training took)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="every row alike; auto: bf16 if the CPU has native bf16 kernels, else fp32")
    parser.add_argument("--seed", type=int, default=42, help="fastai, plain loop and logistic regression")
    parser.add_argument("--recipe-overrides", nargs="*", default=[], metavar="key=value",
                        help="extra overrides of the set's own recipe only, (b) or on the many-label set (m): a "
                             "variation of the shipped recipe")
    add_threads_option(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--work-dir", help="keep the runs here (default: a temp folder, removed)")
    parser.add_argument("--out", help="where recipes_<set>.csv/.md go (default: benchmarks/results/recipes; "
                                      "with --smoke, the temp folder)")
    parser.add_argument("--progress", action="store_true", help="show training and prediction progress")
    add_smoke_option(parser, "48/12 images of 32 px, 2 folds, test_resnet, one epoch, every row")
    args = parser.parse_args(argv)
    args.argv = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    # The config rows are written for one kind of set each; the baselines (f, c, e) run on any.
    many = args.set == MANY_LABEL
    own = "".join(r for r in ROWS if (r in MANY_LABEL_ROWS) == many or r in "fce")
    args.rows = args.rows or (MANY_LABEL_ROWS if many else "".join(r for r in own if r not in MANY_LABEL_ROWS))
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown row(s) {sorted(unknown)}; expected letters of {ROWS}")
    if set(args.rows) - set(own):
        parser.error(f"--rows: row(s) {sorted(set(args.rows) - set(own))} do not run on --set {args.set} "
                     f"(its rows: {own})")
    if args.smoke:
        args.train_images, args.test_images, args.image_size, args.pixel_size = 48, 12, 32, 8
        args.backbone, args.plain_batch_size, args.fastai_epochs, args.fastai_batch_size = "test_resnet", 8, 1, 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    precision = cpu_precision(args.precision)
    bf16 = precision == "bf16"
    metric, score = set_metric(args.set)
    with work_folder(args.work_dir, "bench_recipes_") as work_dir:
        data_root = work_dir / "data" if args.smoke else Path(args.data_root)
        data_dir = data_root / f"{args.set}{args.image_size}_{args.train_images}_{args.test_images}"
        start = time.perf_counter()
        data_keys = ensure_set(args.set, data_dir, args.train_images, args.test_images, args.image_size,
                               args.data_seed)
        print(f"data        {args.set}: {data_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
        shared = shared_overrides(data_keys, work_dir, precision)
        smoke = SMOKE_OVERRIDES if args.smoke else []
        configs = {}
        for key in [k for k in args.rows if k in RECIPES]:
            name, config_file, extra = RECIPES[key]
            if key == "a" or args.smoke:  # the others keep their own backbone unless the run is a smoke run
                extra = [*extra, f"model.backbone={args.backbone}"]
            paths = [f"run.dir={work_dir / 'runs' / key}", f"submission.path={work_dir / f'submission_{key}.csv'}"]
            variation = args.recipe_overrides if key in VARIED_ROWS else []
            configs[key] = (f"({key}) {name}", load_config(config_file, shared + paths + extra + smoke + variation))
        # One fold-0 split for every row: the folds of the main config's settings.
        split_file = "openimages_demo.yaml" if args.set == MANY_LABEL else "small_data.yaml"
        split_cfg = load_config(REPO_ROOT / "configs" / split_file, shared + smoke)
        make_folds(split_cfg, progress=False)
        split_cfg, train_table, vocabulary = load_training_data(split_cfg)
        codes, num_classes = list(vocabulary.codes), len(vocabulary)
        test_table = load_test_table(split_cfg.data)
        folds = load_folds(split_cfg, train_table)
        for label, cfg in configs.values():
            if (cfg.folds.n_splits, cfg.folds.seed) != (split_cfg.folds.n_splits, split_cfg.folds.seed):
                raise SystemExit(f"{label}: its folds settings differ from the shared split's")
        fit_table, val_table = train_table[folds != 0], train_table[folds == 0]
        all_train_y = label_matrix(train_table["labels"], num_classes)
        fit_y, val_y = (label_matrix(t["labels"], num_classes) for t in (fit_table, val_table))
        test_y = hidden_labels(args.set, data_dir, split_cfg, test_table["Id"].tolist(), codes)
        print(f"folds       {split_cfg.folds.n_splits}; fold 0: {len(fit_table)} train, {len(val_table)} validation; "
              f"{len(test_table)} test; {describe_device(torch.device('cpu'))}; {precision}", flush=True)

        rows, seconds = [], {}
        for key, (label, cfg) in configs.items():
            row, seconds[key] = run_recipe(label, cfg, test_table["Id"].tolist(), codes, all_train_y, test_y,
                                           score, args.progress)
            rows.append(row)

        channels = split_cfg.model.in_chans
        if "f" in args.rows:
            if not fastai_available():
                print("fastai      not installed: pip install -r benchmarks/requirements-fastai.txt (row f skipped)")
            else:
                print(f"fastai      xresnet18, {args.fastai_epochs} epochs ...", flush=True)
                size = args.image_size
                pixels = [load_pixels(t, size, channels) for t in (fit_table, val_table, test_table)]
                out = fastai_recipe(pixels[0], fit_y, pixels[1], val_y, pixels[2], args.fastai_epochs,
                                    args.fastai_batch_size, args.seed, score, oriented=oriented(args.set))
                threshold = out["threshold"]
                rows.append(scored_row(
                    "(f) fastai from scratch (xresnet18, one-cycle, aug_transforms, TTA)",
                    score(val_y, out["val_probs"] >= threshold), test_y,
                    (out["test_probs"] >= threshold).astype(np.uint8), all_train_y, out["seconds"] / 60, score,
                    f"lr_find valley {out['lr']:.2e}, {args.fastai_epochs} epochs, global threshold {threshold:.2f}"))

        if "c" in args.rows:
            start = time.perf_counter()
            fit_px, val_px, test_px = (load_pixels(t, args.pixel_size, channels).reshape(len(t), -1) / 255.0
                                       for t in (fit_table, val_table, test_table))
            lr_val = decide(pixel_logistic_regression(fit_px, fit_y, val_px, args.lr_c, args.seed), 0.5)
            lr_test = decide(pixel_logistic_regression(fit_px, fit_y, test_px, args.lr_c, args.seed), 0.5)
            rows.append(scored_row(f"(c) pixel logistic regression ({args.pixel_size} px)", score(val_y, lr_val),
                                   test_y, lr_test, all_train_y, (time.perf_counter() - start) / 60, score,
                                   f"C {args.lr_c}, at 0.5"))

        if "d" in args.rows:
            budget = args.plain_seconds if args.plain_seconds is not None else seconds.get("b", 60.0)
            print(f"plain loop  {args.backbone}, {budget:.0f} s budget ...", flush=True)
            fit_x, val_x, test_x = (torch.from_numpy(load_pixels(t, args.image_size, channels))
                                    for t in (fit_table, val_table, test_table))
            normalise = channel_normaliser(fit_x)
            model, steps, epochs, took = plain_timm_loop(fit_x, fit_y, normalise, budget, args.backbone,
                                                         args.plain_batch_size, args.plain_lr, args.seed, bf16)
            plain_val = decide(plain_probs(model, val_x, normalise, bf16), 0.5)
            plain_test = decide(plain_probs(model, test_x, normalise, bf16), 0.5)
            rows.append(scored_row(f"(d) plain timm loop ({args.backbone}, same seconds as b)",
                                   score(val_y, plain_val), test_y, plain_test, all_train_y, took / 60, score,
                                   f"AdamW {args.plain_lr:g}, {steps} steps, {epochs} epochs, at 0.5"))

        if "e" in args.rows:
            prior = fit_y.mean(axis=0)
            constant_val = decide(np.tile(prior, (len(val_y), 1)), 0.5)
            constant_test = decide(np.tile(prior, (len(test_y), 1)), 0.5)
            every_class = np.ones_like(test_y)
            rows.append(scored_row("(e) constant prior (train label rates)", score(val_y, constant_val), test_y,
                                   constant_test, all_train_y, 0.0, score,
                                   f"at 0.5; every class on every image: test {score(test_y, every_class):.4f}"))

        if "k" in args.rows:
            constant = best_constant(fit_y, score)
            named = " ".join(codes[i] for i in np.flatnonzero(constant))
            rows.append(scored_row("(k) best constant submission", score(val_y, np.tile(constant, (len(val_y), 1))),
                                   test_y, np.tile(constant, (len(test_y), 1)), all_train_y, 0.0, score,
                                   f"the same labels for every image, chosen on the training rows: {named}"))

        print_table(rows, metric)
        recipe = next((r for r in rows if r.name[:3] in ("(b)", "(m)")), None)
        comparisons = [compare(recipe, other, metric) for other in rows if recipe and other is not recipe]
        comparisons += [f"{r.name} is degenerate: {r.degenerate}" for r in rows if r.degenerate]
        print("\n" + "\n".join(comparisons))

        out = Path(args.out) if args.out else work_dir / "results" if args.smoke else DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([vars(r) for r in rows]).to_csv(out / f"recipes_{args.set}.csv", index=False, float_format="%.4f")
        header = (f"# Recipes on real images: {args.set}\n\n`python -m benchmarks.bench_recipes {args.argv}`\n\n"
                  f"{len(train_table)} train / {len(test_table)} test images of {args.image_size} px "
                  f"({args.set}, seed {args.data_seed}), {num_classes} classes, scored by {metric}; fold 0 of "
                  f"{split_cfg.folds.n_splits}: {len(fit_table)} train, {len(val_table)} validation. "
                  f"{describe_device(torch.device('cpu'))}; precision {precision}."
                  + (f" Recipe (b)/(m) overrides: `{' '.join(args.recipe_overrides)}`."
                     if args.recipe_overrides else ""))
        (out / f"recipes_{args.set}.md").write_text(markdown(rows, header, comparisons, metric))
        print(f"wrote {out / f'recipes_{args.set}.csv'}, {out / f'recipes_{args.set}.md'}")


if __name__ == "__main__":
    run_cli(main)
