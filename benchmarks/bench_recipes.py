"""Does the pipeline learn on real images it was never tuned for? Two config recipes vs plain baselines.

    .venv/bin/python -m benchmarks.bench_recipes [--data input/real128] [--out benchmarks/results/recipes]
    .venv/bin/python -m benchmarks.bench_recipes --smoke   # every row end to end on a tiny run, in seconds

One run, one dataset, one CPU. The data is ``benchmarks.real_images.make_real_dataset`` (600 train and 200
test images of 128 px, 9 power-law classes, patches of real photographs in the green channel, labels
invariant to flips and right-angle rotations; test patches come from parts of the source images training
never sees; ``test_solution.csv`` holds the hidden test labels). It is written to ``--data`` (reused when it
is already there) or to the temp work folder. Folds: ``src.folds.make_folds`` (the recipes' 5 splits).
Each recipe trains fold 0 only (``src.train.train``), predicts with ``predict.folds=[0]`` and
``predict.force=true`` (``src.predict.predict``; whether predict would have refused the submission as
degenerate is recorded with ``src.predict.degenerate_reasons``) and its submission is scored against
``test_solution.csv``:

a. "main config, data keys only": ``configs/hpa_nasnet512.yaml`` with only what a held-out trial changed
   (data keys, paths, ``resnet18`` from scratch, 15 epochs, batch 32, CPU, 2 workers); accumulation,
   learning rates, EMA, warm-up, loss and TTA stay as the config has them.
b. "small-data recipe": ``configs/small_data.yaml`` with only data keys, paths and ``train.device=cpu``.

Baselines on the same fold-0 split and test set:

c. pixel logistic regression (``benchmarks.bench_learning``'s: one-vs-rest, 32 px RGBY, standardised);
d. a plain timm loop: ``timm.create_model(..., in_chans=4)``, AdamW at a constant 1e-3, BCE-with-logits,
   a random D4 view per batch, autocast as ``--precision``, batch 32, trained for the wall-clock seconds recipe (b)'s
   training took (validation included there, not here); identity view at test time;
e. the constant prior: every class scored at its training rate.

Every row is scored by macro-F1 (sklearn ``f1_score(average="macro")`` on multi-hot matrices, a class
never true nor predicted counting 0). "OOF" is fold 0's validation set: for the recipes, the OOF macro-F1
of the chosen threshold strategy in the prediction report (``strategies.csv``; thresholds tuned on these
same rows, so optimistic); for the baselines, decisions at 0.5. Test decisions: the recipes' submission;
the baselines at 0.5. Every image keeps its top class. W&B is off.

Precision (``--precision``, default ``auto``): bf16 where the CPU has native bf16 kernels (oneDNN reports
AVX512-BF16/AMX), else fp32, set alike for both recipes (``train.precision``, which predict also uses) and the
plain loop (autocast on or off). Both configs say bf16, but on an AVX2-only CPU bf16 autocast sends resnet18's
matrix products to torch's reference GEMM: a training step at 128 px was about 20x slower than fp32.

Writes ``recipes.csv`` and ``recipes.md`` to ``--out``. ``--threads`` defaults to 2 here: the benchmark is
meant to have the machine to itself.

``--smoke``: 48 train / 12 test images of 32 px, 2 folds, ``test_resnet``, one epoch of batch 8, 8 px
pixels for the logistic regression; outputs go to the temp folder unless ``--out`` is given. Every row end
to end, no meaningful figure.
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
from sklearn.metrics import f1_score

from benchmarks.bench_learning import pixel_features, pixel_logistic_regression
from benchmarks.common import (
    REPO_ROOT,
    add_smoke_option,
    add_threads_option,
    describe_device,
    limit_cpu_threads,
    work_folder,
)
from benchmarks.real_images import make_real_dataset
from src.cli import run_cli
from src.config import Config, load_config, override
from src.data import label_matrix
from src.folds import load_folds, make_folds
from src.formats import load_test_table, load_train_table, parse_target
from src.images import read_rgby
from src.metrics import decide
from src.predict import degenerate_reasons, predict
from src.train import train

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "recipes"

# name -> (config file, the overrides beyond data keys and paths)
RECIPES = {
    "main config, data keys only": ("hpa_nasnet512.yaml", [
        "model.pretrained=false", "train.epochs=15", "train.batch_size=32", "train.num_workers=2"]),
    "small-data recipe": ("small_data.yaml", []),
}
# The tiny run of --smoke: the sizes of tests/conftest.py's tiny config.
SMOKE_OVERRIDES = ["folds.n_splits=2", "folds.rare_classes=warn", "train.epochs=1", "train.batch_size=8",
                   "train.num_workers=0"]


@dataclass
class Row:
    name: str
    oof_macro_f1: float
    test_macro_f1: float
    train_minutes: float
    notes: str
    degenerate: str = ""  # why predict would refuse this row's test decisions without --force ("" if it would not)


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(f1_score(truth, predicted, average="macro", zero_division=0))


def label_cells(csv_path: Path, column: str, ids: list[str], num_classes: int) -> np.ndarray:
    """Multi-hot matrix of a csv's label column (``Target`` or ``Predicted``), rows in the order of ``ids``."""
    frame = pd.read_csv(csv_path, dtype={"Id": str, column: str}, keep_default_na=False).set_index("Id")
    return label_matrix([parse_target(frame.at[i, column], num_classes)[0] for i in ids], num_classes)


def scored_row(name: str, oof_macro_f1: float, test_y: np.ndarray, test_predicted: np.ndarray,
               train_y: np.ndarray, train_minutes: float, *notes: str) -> Row:
    """A table row; test decisions that predict would refuse as degenerate are flagged in its notes."""
    reasons = "; ".join(degenerate_reasons(test_predicted, train_y))
    notes += ("degenerate: refused without --force",) if reasons else ()
    return Row(name, oof_macro_f1, macro_f1(test_y, test_predicted), train_minutes,
               "; ".join(note for note in notes if note), reasons)


def run_recipe(name: str, cfg: Config, test_ids: list[str], test_y: np.ndarray, train_y: np.ndarray,
               progress: bool) -> tuple[Row, float]:
    """Train fold 0 of ``cfg``, predict with that fold alone, score the submission; (row, training seconds)."""
    shutil.rmtree(cfg.run.dir, ignore_errors=True)  # a fresh run, also when --work-dir is reused
    print(f"{name}: {cfg.model.backbone}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size} x "
          f"{cfg.train.accum_steps}, lr {cfg.train.lr} (backbone {cfg.train.backbone_lr}), loss {cfg.loss.name}, "
          f"ema {cfg.train.ema}, {len(cfg.predict.tta)} TTA views ...", flush=True)
    start = time.perf_counter()
    result = train(cfg, fold=0, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    submission = predict(override(cfg, **{"predict.folds": [0], "predict.force": True}), progress=progress)
    predict_seconds = time.perf_counter() - start
    strategies = pd.read_csv(Path(cfg.run.dir) / "report" / "strategies.csv", keep_default_na=False)
    chosen = strategies[strategies["chosen"] == "<-"].iloc[0]
    fixed = strategies[strategies["strategy"] == "fixed"]["oof_macro_f1_in_sample"]
    predicted = label_cells(Path(submission), "Predicted", test_ids, cfg.data.num_classes)
    row = scored_row(name, float(chosen["oof_macro_f1_in_sample"]), test_y, predicted, train_y, train_seconds / 60,
                     f"OOF {chosen['strategy']} (fixed 0.5: {fixed.iloc[0]:.3f})",
                     f"best epoch {result['best_epoch']}/{cfg.train.epochs} ({result.get('best_weights', 'raw')})",
                     f"{result['steps']} steps", f"predict {predict_seconds:.0f} s")
    print(f"  -> test macro-F1 {row.test_macro_f1:.4f}, training {train_seconds:.0f} s", flush=True)
    return row, train_seconds


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (else autocast falls back to a slow reference GEMM)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def load_images(table: pd.DataFrame, size: int) -> torch.Tensor:
    """N x 4 x size x size uint8 images of a table's rows."""
    images = np.stack([read_rgby(d, i, size) for d, i in zip(table["image_dir"], table["Id"])])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def channel_normaliser(images: torch.Tensor):
    """uint8 images -> float, standardised per channel with the statistics of ``images``."""
    mean = images.float().mean(dim=(0, 2, 3), keepdim=True)
    std = images.float().std(dim=(0, 2, 3), keepdim=True)
    return lambda batch: (batch.float() - mean) / std


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


@torch.no_grad()
def plain_probs(model: torch.nn.Module, images: torch.Tensor, normalise, bf16: bool, batch_size: int = 64
                ) -> np.ndarray:
    outputs = []
    for batch in images.split(batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs.append(torch.sigmoid(model(normalise(batch)).float()))
    return torch.cat(outputs).numpy()


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows) + 2
    print(f"\n{'predictor':<{width}}{'OOF macro-F1':>13}{'test macro-F1':>15}{'train min':>11}  notes")
    for r in rows:
        print(f"{r.name:<{width}}{r.oof_macro_f1:>13.4f}{r.test_macro_f1:>15.4f}{r.train_minutes:>11.2f}  {r.notes}")


def markdown(rows: list[Row], header: str, comparisons: list[str]) -> str:
    lines = [header, "", "| predictor | OOF macro-F1 (fold 0) | test macro-F1 | train minutes | notes |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.oof_macro_f1:.4f} | {r.test_macro_f1:.4f} | {r.train_minutes:.2f} | {r.notes} |"
              for r in rows]
    return "\n".join(lines + [""] + [f"- {c}" for c in comparisons]) + "\n"


def compare(recipe: Row, baseline: Row) -> str:
    ratio = recipe.test_macro_f1 / baseline.test_macro_f1 if baseline.test_macro_f1 > 0 else float("inf")
    return (f"{recipe.name} vs {baseline.name}: test macro-F1 {recipe.test_macro_f1:.4f} vs "
            f"{baseline.test_macro_f1:.4f} (difference {recipe.test_macro_f1 - baseline.test_macro_f1:+.4f}, "
            f"ratio {ratio:.2f}); OOF {recipe.oof_macro_f1:.4f} vs {baseline.oof_macro_f1:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the real-image dataset folder, reused when present (default: in the work "
                                       "folder)")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=9, help="number of classes (at most 9)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--backbone", default="resnet18", help="recipe (a) and the plain loop")
    parser.add_argument("--pixel-size", type=int, default=32, help="logistic regression: downsampled side")
    parser.add_argument("--lr-c", type=float, default=0.01, help="logistic regression: inverse L2 strength")
    parser.add_argument("--plain-lr", type=float, default=1e-3, help="plain timm loop: AdamW learning rate")
    parser.add_argument("--plain-batch-size", type=int, default=32)
    parser.add_argument("--plain-seconds", type=float,
                        help="plain timm loop: training seconds (default: what recipe (b)'s training took)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="recipes and plain loop alike; auto: bf16 if the CPU has native bf16 kernels, else fp32")
    parser.add_argument("--seed", type=int, default=42, help="plain loop and logistic regression")
    parser.add_argument("--small-data-overrides", nargs="*", default=[], metavar="key=value",
                        help="extra overrides of recipe (b) only (a variation of the small-data recipe)")
    add_threads_option(parser)
    parser.set_defaults(threads=2)
    parser.add_argument("--work-dir", help="keep the runs here (default: a temp folder, removed)")
    parser.add_argument("--out", help="where recipes.csv and recipes.md go (default: benchmarks/results/recipes; "
                                      "with --smoke, the temp folder)")
    parser.add_argument("--progress", action="store_true", help="show training and prediction progress")
    add_smoke_option(parser, "48/12 images of 32 px, 2 folds, test_resnet, one epoch, every row")
    args = parser.parse_args(argv)
    args.argv = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.smoke:
        args.train_images, args.test_images, args.image_size, args.pixel_size, args.classes = 48, 12, 32, 8, 4
        args.backbone, args.plain_batch_size = "test_resnet", 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_cpu_threads(args.threads)
    num_classes = args.classes
    precision = args.precision if args.precision != "auto" else "bf16" if native_bf16() else "fp32"
    bf16 = precision == "bf16"
    with work_folder(args.work_dir, "bench_recipes_") as work_dir:
        data_dir = Path(args.data) if args.data else work_dir / "data"
        if (data_dir / "train.csv").is_file() and (data_dir / "test_solution.csv").is_file():
            print(f"data        reusing {data_dir}", flush=True)
        else:
            start = time.perf_counter()
            make_real_dataset(data_dir, n_train=args.train_images, n_test=args.test_images, size=args.image_size,
                              num_classes=num_classes, seed=args.data_seed, progress=False)
            print(f"data        {args.train_images} train / {args.test_images} test real images, {args.image_size} "
                  f"px -> {data_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
        shared = [f"data.dir={data_dir}", f"data.num_classes={num_classes}", f"data.image_size={args.image_size}",
                  f"folds.path={work_dir / 'folds.csv'}", "train.device=cpu", f"train.precision={precision}",
                  "wandb.mode=disabled"]
        smoke = SMOKE_OVERRIDES if args.smoke else []
        configs = {}
        for key, (name, (config_file, extra)) in zip("ab", RECIPES.items()):
            if key == "a" or args.smoke:  # (b) keeps its own resnet18 unless the run is a smoke run
                extra = [*extra, f"model.backbone={args.backbone}"]
            paths = [f"run.dir={work_dir / 'runs' / key}", f"submission.path={work_dir / f'submission_{key}.csv'}"]
            variation = args.small_data_overrides if key == "b" else []
            configs[f"({key}) {name}"] = load_config(REPO_ROOT / "configs" / config_file,
                                                     shared + paths + extra + smoke + variation)
        first, *others = configs.values()
        split_keys = ("n_splits", "seed", "group_duplicates", "duplicate_distance")  # rare_classes only warns
        if any(getattr(cfg.folds, k) != getattr(first.folds, k) for cfg in others for k in split_keys):
            raise SystemExit(f"the recipes' folds settings {split_keys} differ: they cannot share one fold-0 split")
        make_folds(first, progress=False)

        train_table, test_table = load_train_table(first.data), load_test_table(first.data)
        folds = load_folds(first, train_table)
        fit_table, val_table = train_table[folds != 0], train_table[folds == 0]
        all_train_y = label_matrix(train_table["labels"], num_classes)
        fit_y, val_y = (label_matrix(t["labels"], num_classes) for t in (fit_table, val_table))
        test_ids = test_table["Id"].tolist()
        test_y = label_cells(data_dir / "test_solution.csv", "Target", test_ids, num_classes)
        print(f"folds       {first.folds.n_splits}; fold 0: {len(fit_table)} train, {len(val_table)} validation; "
              f"{len(test_ids)} test; {describe_device(torch.device('cpu'))}; {precision}", flush=True)

        rows, seconds = [], {}
        for name, cfg in configs.items():
            row, seconds[name] = run_recipe(name, cfg, test_ids, test_y, all_train_y, args.progress)
            rows.append(row)

        start = time.perf_counter()
        lr_val = decide(pixel_logistic_regression(
            pixel_features(fit_table, args.pixel_size), fit_y, pixel_features(val_table, args.pixel_size),
            args.lr_c, args.seed), 0.5)
        lr_test = decide(pixel_logistic_regression(
            pixel_features(fit_table, args.pixel_size), fit_y, pixel_features(test_table, args.pixel_size),
            args.lr_c, args.seed), 0.5)
        rows.append(scored_row(f"(c) pixel logistic regression ({args.pixel_size} px)", macro_f1(val_y, lr_val),
                               test_y, lr_test, all_train_y, (time.perf_counter() - start) / 60,
                               f"C {args.lr_c}, at 0.5"))

        budget = args.plain_seconds if args.plain_seconds is not None else seconds[list(configs)[1]]
        print(f"plain loop  {args.backbone}, {budget:.0f} s budget ...", flush=True)
        fit_x = load_images(fit_table, args.image_size)
        normalise = channel_normaliser(fit_x)
        model, steps, epochs, took = plain_timm_loop(fit_x, fit_y, normalise, budget, args.backbone,
                                                     args.plain_batch_size, args.plain_lr, args.seed, bf16)
        plain_val = decide(plain_probs(model, load_images(val_table, args.image_size), normalise, bf16), 0.5)
        plain_test = decide(plain_probs(model, load_images(test_table, args.image_size), normalise, bf16), 0.5)
        rows.append(scored_row(f"(d) plain timm loop ({args.backbone}, same seconds as b)",
                               macro_f1(val_y, plain_val), test_y, plain_test, all_train_y, took / 60,
                               f"AdamW {args.plain_lr:g}, {steps} steps, {epochs} epochs, at 0.5"))

        prior = fit_y.mean(axis=0)
        constant_val = decide(np.tile(prior, (len(val_y), 1)), 0.5)
        constant_test = decide(np.tile(prior, (len(test_y), 1)), 0.5)
        every_class = np.ones_like(test_y)
        rows.append(scored_row("(e) constant prior (train label rates)", macro_f1(val_y, constant_val), test_y,
                               constant_test, all_train_y, 0.0,
                               f"at 0.5; every class on every image: test {macro_f1(test_y, every_class):.4f}"))

        print_table(rows)
        recipe_rows, pixel_row, plain_row = rows[:2], rows[2], rows[3]
        comparisons = [compare(r, b) for r in recipe_rows for b in (plain_row, pixel_row)]
        comparisons += [f"{r.name} is degenerate: {r.degenerate}" for r in rows if r.degenerate]
        print("\n" + "\n".join(comparisons))

        out = Path(args.out) if args.out else work_dir / "results" if args.smoke else DEFAULT_OUT
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([vars(r) for r in rows]).to_csv(out / "recipes.csv", index=False, float_format="%.4f")
        header = (f"# Recipes on real images\n\n`python -m benchmarks.bench_recipes {args.argv}`\n\n"
                  f"{len(train_table)} train / {len(test_ids)} test images of {args.image_size} px "
                  f"(`benchmarks.real_images`, seed {args.data_seed}), {num_classes} classes; fold 0 of "
                  f"{first.folds.n_splits}: {len(fit_table)} train, {len(val_table)} validation. "
                  f"{describe_device(torch.device('cpu'))}; precision {precision} (recipes and plain loop)."
                  + (f" Small-data overrides: `{' '.join(args.small_data_overrides)}`." if args.small_data_overrides
                     else ""))
        (out / "recipes.md").write_text(markdown(rows, header, comparisons))
        print(f"wrote {out / 'recipes.csv'}, {out / 'recipes.md'}")


if __name__ == "__main__":
    run_cli(main)
