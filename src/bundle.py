"""The inference bundle: what a Kaggle notebook needs to predict offline, laid out as a Kaggle dataset.

    python -m src.bundle [--config FILE] [key=value ...] [--out DIR] [--force] [--fp16] [--wheels]

Built from a run that ``python -m src.predict`` has predicted (its ``decision.json``), so the notebook makes the
same submission predict made, from the weights alone::

    dataset-metadata.json        title, id (kaggle.dataset) and licenses: `kaggle datasets create -p DIR -r zip`
    manifest.json                what is inside: experiments and folds, weights dtype, TTA, the decision, wheels
    config.yaml                  the resolved config predict ran with (infer.py replaces data.dir with --data)
    labels.csv                   the label vocabulary (index, code, name)
    decision.json                the decision predict fitted on OOF, as applied: strategy, thresholds or k, label
                                 bounds (rate: the label rates, fitted again on the notebook's test scores)
    experiments/<i>-<run>/       each experiment of the ensemble as a run folder holding weights only:
      config.yaml                its resolved training config
      fold<N>/weights.pt         the weights validation chose (EMA or raw; src.checkpoint.model_weights), no
                                 optimizer state; float16 with --fp16 (loaded back into float32 parameters)
      fold<N>/label_embedding.npz   label-embedding runs: the fold's label vectors
    src/                         a copy of this pipeline's src package (infer.py imports this copy)
    infer.py                     python infer.py --data /kaggle/input/<competition> [--out submission.csv]
    inference.ipynb              a notebook that finds the bundle and the data under /kaggle/input, installs the
                                 wheels and runs infer.py (progress bars shown)
    wheels/                      --wheels: the pinned packages a Kaggle image lacks (``WHEELS``), pip download
                                 --no-deps; torch and torchvision are not among them (``NOT_SHIPPED``)

The bundle is written as one folder (staged, then renamed into place). It replaces only what this command made: an
``--out`` that holds anything but an earlier bundle (its manifest.json) is refused before any work, and ``--force``
never lets it replace a run folder, the data folder or the checkout (nor a folder holding one).
:func:`predict_from_bundle` is what infer.py runs: every fold's network under the configured TTA views, folds
averaged, experiments weighted, the recorded decision applied, the submission validated, as ``src.predict`` does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
import yaml

from src.checkpoint import file_fingerprint, load_tensors, model_weights
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError, load_config, override
from src.data import Vocabulary, with_vocabulary
from src.dataset import RGBYDataset
from src.decision_record import (
    apply_record,
    config_differences,
    decision_path,
    read_record,
    record_decision,
)
from src.duplicates import apply_recorded_overrides
from src.ensemble import weighted_mean
from src.files import Staging, ensure_writable, save_config, write_atomic
from src.formats import label_separator, load_test_table, submission_columns
from src.model import check_views, resolve_device
from src.predict import (
    fold_mean,
    fold_networks,
    make_submission,
    require_finite,
    score_dataset,
)
from src.progress import note
from src.run_folder import RunFolder, run_vocabulary
from src.score_table import combine_scores

BUNDLE_KIND = "multilabel-pipeline inference bundle"
BUNDLES_DIR = "bundles"
MANIFEST_FILE = "manifest.json"
METADATA_FILE = "dataset-metadata.json"
EXPERIMENTS_DIR = "experiments"
WEIGHTS_FILE = "weights.pt"
INFER_FILE = "infer.py"
NOTEBOOK_FILE = "inference.ipynb"
WHEELS_DIR = "wheels"
PLACEHOLDER_OWNER = "your-kaggle-username"
LICENSE = "other"  # weights trained on competition data: the competition's rules, not an open licence
REPO_ROOT = Path(__file__).resolve().parents[1]
# Pinned packages (requirements.txt) that a Kaggle image lacks at these versions, shipped by --wheels, and why.
# All pure Python (py3-none-any), so one wheel fits any Kaggle image.
WHEELS = {
    "timm": "the backbones: a state dict only loads into the module names and shapes of the version trained with",
    "albumentations": "src.dataset imports it (Kaggle images carry another version)",
    "albucore": "albumentations' uint8 kernels at the version albumentations pins; src.augment calls it",
    "iterative-stratification": "not in Kaggle images; src.folds imports it, so the whole src copy imports",
}
NOT_SHIPPED = ("torch and torchvision: every Kaggle image ships them, built for its own CUDA and driver; a PyPI "
               "CUDA wheel of torch is about 1 GB more to upload and might not match the image")


# -- building ----------------------------------------------------------------------------------------------
def pinned_versions(requirements: Path = REPO_ROOT / "requirements.txt") -> dict[str, str]:
    """``{package: version}`` of the ``name==version`` pins (names lower-case)."""
    pins = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def download_wheels(dest: Path, pip: Sequence[str] | None = None) -> dict[str, str]:
    """``pip download --no-deps`` the ``WHEELS`` at their pinned versions into ``dest``; returns what it got."""
    pins = pinned_versions()
    missing = [name for name in WHEELS if name not in pins]
    if missing:
        raise PipelineError(f"requirements.txt pins no version of {missing}: the bundle ships pinned wheels only")
    specs = [f"{name}=={pins[name]}" for name in WHEELS]
    dest.mkdir(parents=True, exist_ok=True)
    command = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(dest), *specs]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PipelineError(f"pip download of {specs} failed ({exc}); nothing written: build without --wheels, or "
                            "where the package index can be reached") from None
    if result.returncode != 0:
        last = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise PipelineError(f"pip download of {specs} failed ({last[-1].strip() if last else result.returncode}); "
                            "nothing written: build without --wheels, or where the package index can be reached")
    found = {path.name for path in dest.glob("*.whl")}
    lacking = [name for name in WHEELS if not any(f.lower().startswith(name.replace("-", "_") + "-") for f in found)]
    if lacking:
        raise PipelineError(f"pip download gave no wheel of {lacking} (found {sorted(found)}); nothing written")
    return {name: pins[name] for name in WHEELS}


def dataset_slug(name: str) -> str:
    """A Kaggle dataset slug (lower-case letters, digits and dashes, 5 to 50 characters) from a run's name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug or 'run'}-bundle"[-50:].strip("-")


def notebook(competition: str, sample_submission: str, bundle_id: str, wheels: dict[str, str]) -> dict:
    """``inference.ipynb`` (nbformat 4): find this bundle and the competition data under /kaggle/input, install
    the bundle's wheels (offline), run infer.py in the kernel (its progress bars show), show the submission."""

    def cell(kind: str, number: int, source: str) -> dict:
        body = {"cell_type": kind, "id": f"cell-{number}", "metadata": {}, "source": source.strip("\n")}
        return body | ({"execution_count": None, "outputs": []} if kind == "code" else {})

    find = f'''
import json
from pathlib import Path

INPUT = Path("/kaggle/input")
COMPETITION = {competition!r}
BUNDLE_ID = {bundle_id!r}


def find_bundle() -> Path:
    """The attached dataset holding this bundle (its manifest.json), wherever Kaggle mounts it."""
    for pattern in ("*/manifest.json", "*/*/manifest.json", "*/*/*/manifest.json"):
        for manifest in sorted(INPUT.glob(pattern)):
            try:
                if json.loads(manifest.read_text()).get("bundle_id") == BUNDLE_ID:
                    return manifest.parent
            except (OSError, ValueError):
                continue
    raise FileNotFoundError(f"no bundle {{BUNDLE_ID}} under {{INPUT}}: add the bundle's dataset as an input")


def find_data() -> Path:
    """The competition's data: /kaggle/input/<competition>, or wherever its {sample_submission} is."""
    for folder in (INPUT / COMPETITION, INPUT / "competitions" / COMPETITION):
        if (folder / {sample_submission!r}).is_file():
            return folder
    for pattern in ("*/{sample_submission}", "*/*/{sample_submission}"):
        for found in sorted(INPUT.glob(pattern)):
            return found.parent
    raise FileNotFoundError(f"no {{COMPETITION}} data under {{INPUT}}: add the competition as an input")


BUNDLE, DATA = find_bundle(), find_data()
print("bundle:", BUNDLE)
print("data:", DATA)
'''
    install = f'''
import subprocess
import sys

# Offline: the pinned packages a Kaggle image lacks, from the bundle's wheels (torch comes with the image).
WHEELS = {[f"{name}=={version}" for name, version in wheels.items()]!r}
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                "--find-links", str(BUNDLE / "wheels"), *WHEELS], check=True)
'''
    run = '''
import runpy
import sys

# infer.py imports the bundle's own copy of the pipeline (src/ beside it) and writes submission.csv here.
sys.argv = ["infer.py", "--data", str(DATA), "--out", "submission.csv"]
runpy.run_path(str(BUNDLE / "infer.py"), run_name="__main__")
'''
    show = '''
import pandas as pd

submission = pd.read_csv("submission.csv", dtype=str, keep_default_na=False)
print(len(submission), "rows")
submission.head()
'''
    intro = ("# Inference from the bundle\n\nAdd two inputs to this notebook: the bundle's dataset and the "
             f"`{competition}` competition data. Internet can stay off: the cells below find both under "
             "`/kaggle/input`, install the bundle's wheels, and run `infer.py`, which writes `submission.csv` "
             "(folds and TTA as configured; the decision was fitted on out-of-fold predictions when the bundle "
             "was made).")
    sources = [("markdown", intro), ("code", find)] + ([("code", install)] if wheels else []) + [
        ("code", run), ("code", show)]
    return {"cells": [cell(kind, i, source) for i, (kind, source) in enumerate(sources)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


INFER_PY = '''"""Predict with this inference bundle (written by `python -m src.bundle`): no network, no run folder and
no OOF files needed.

    python infer.py --data /kaggle/input/<competition> [--out submission.csv] [--device auto|cpu|cuda]
                    [--precision auto|fp32|bf16|fp16] [--workers N] [--batch-size N] [--quiet]

It imports the bundle's own copy of the pipeline (src/ beside this file), never another one.
"""

import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent
sys.path.insert(0, str(BUNDLE))  # the bundle's src package first: the one place a path is added

import src  # noqa: E402

if Path(src.__file__).resolve().parent != BUNDLE / "src":
    sys.exit(f"error: src was already imported from {Path(src.__file__).parent}, not from this bundle "
             f"({BUNDLE / 'src'}): run infer.py in a fresh process (or restart the kernel)")

from src.bundle import infer_main  # noqa: E402

if __name__ == "__main__":
    infer_main(BUNDLE)
'''


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@dataclass(frozen=True)
class Experiment:
    """One experiment of the recorded ensemble, as the bundle ships it."""

    path: str  # its run folder inside the bundle
    folder: RunFolder  # its run folder
    cfg: Config  # its training config
    folds: list[tuple[int, Path, str]]  # (fold, the checkpoint the prediction used, its recorded sha256)
    weight: float  # its weight in the ensemble


def predicted_record(cfg: Config) -> tuple[dict, Vocabulary]:
    """The decision record of the last prediction of ``cfg``'s run and the runs' label vocabulary; refused when that
    prediction was made under another config than ``cfg``."""
    record = read_record(cfg.run.dir)
    vocabulary = run_vocabulary(cfg)
    differences = config_differences(record["config"], with_vocabulary(cfg, vocabulary).model_dump(mode="json"))
    if differences:
        raise PipelineError(f"the last prediction of {cfg.run.dir} was made under another config than this one "
                            f"({'; '.join(differences[:4])}): bundle with the config that predicted, or run "
                            "`python -m src.predict` with this one first")
    return record, vocabulary


def check_out(out: Path, cfg: Config, force: bool = False) -> None:
    """Refuse (one line naming ``out`` and why) an ``--out`` the bundle may not replace: anything but a missing
    path, an empty folder or an earlier bundle (its manifest.json); ``force`` allows another folder, but never a
    run folder, the data folder, the checkout or the working folder, a folder holding one of them, or a folder
    inside a run folder."""
    if out.is_symlink():
        raise PipelineError(f"--out {out} is a symbolic link: a bundle replaces only a folder it made; give another "
                            "--out")
    target = out.resolve()
    runs = [Path(cfg.run.dir), *(Path(ref.dir) for ref in cfg.predict.runs)]
    kept = {"the run folder": runs, "the data folder": [Path(cfg.data.dir)],
            "the checkout": [REPO_ROOT], "the working folder": [Path.cwd()]}
    for what, folders in kept.items():
        for folder in (folder.resolve() for folder in folders):
            if target == folder or target in folder.parents:
                holds = "" if target == folder else f" (it holds {what} {folder})"
                raise PipelineError(f"--out {out} is {what if not holds else 'a folder'}{holds}: never replaced by a "
                                    "bundle, even with --force; give another --out")
            if what == "the run folder" and folder in target.parents:
                raise PipelineError(f"--out {out} is inside the run folder {folder}, which training and predict own: "
                                    "give another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise PipelineError(f"--out {out} is a file, not a folder: a bundle replaces only a folder it made; give "
                            "another --out")
    if not any(out.iterdir()) or is_bundle(out) or force:
        return
    raise PipelineError(f"--out {out} holds files this command did not make (no {MANIFEST_FILE} of a bundle): "
                        "refused, nothing touched; give another --out, or --force to replace it")


def is_bundle(folder: Path) -> bool:
    """Whether ``folder`` is a bundle this command wrote: its manifest.json carries the bundle's kind and id."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == BUNDLE_KIND and bool(manifest.get("bundle_id"))


def collect_weights(record: dict, run_dir: str | Path) -> list[Experiment]:
    """Each experiment of the prediction recorded in ``run_dir`` with the checkpoints it used; refused when one
    is gone, when the record holds no fingerprint of it (an older predict), or when its size differs from the
    recorded one (its bytes are compared as :func:`write_weights` reads them)."""
    ensemble = record.get("ensemble") or {}
    if ensemble.get("stack") is not None or isinstance((ensemble.get("weights") or [0])[0], list) or \
            any(run.get("dir") is None for run in record["runs"]):
        how = ensemble.get("describe") or "score tables"
        raise PipelineError(f"{decision_path(run_dir)}: the prediction used {how}; a bundle ships run folders "
                            "combined by one weight per run: predict with "
                            "predict.stack=none, predict.weights_per_class=false and run folders only to bundle")
    experiments = []
    for i, run in enumerate(record["runs"]):
        folder = RunFolder(run["dir"])
        if "checkpoints" not in run:
            raise PipelineError(f"{decision_path(run_dir)} records no fingerprint of the checkpoints (written by an "
                                "older predict): run `python -m src.predict` again")
        folds = []
        for used in run["checkpoints"]:
            path = folder.checkpoint(used["fold"], record.get("checkpoint", "best"))
            if not path.is_file():
                raise PipelineError(f"{path} not found: the prediction used it; restore it or run predict again")
            if path.stat().st_size != used["size"]:
                raise changed_checkpoint(path, run_dir)
            folds.append((used["fold"], path, used["sha256"]))
        name = f"{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', folder.root.resolve().name)}"
        experiments.append(Experiment(f"{EXPERIMENTS_DIR}/{name}", folder, folder.load_config(), folds, run["weight"]))
    return experiments


def changed_checkpoint(path: Path, run_dir: str | Path) -> PipelineError:
    """The refusal of a checkpoint whose content is not the one the prediction used."""
    return PipelineError(f"{path} changed after the prediction (its content differs from {decision_path(run_dir)}'s "
                         "record): run `python -m src.predict` again so the decision fits the weights shipped")


def write_weights(root: Path, experiments: list[Experiment], fp16: bool, run_dir: str | Path) -> None:
    """Each experiment as a run folder under ``root`` holding its config and, per fold, the weights inference
    uses (no optimizer, scheduler or RNG state; float16 with ``fp16``) and the label vectors a loss fitted;
    refused when a checkpoint's bytes are not those the prediction recorded in ``run_dir``."""
    for experiment in experiments:
        shipped = RunFolder(root / experiment.path)
        save_config(experiment.cfg, shipped.config())
        for fold, checkpoint, sha256 in experiment.folds:
            with open(checkpoint, "rb") as handle:  # one open file: the bytes compared are the bytes loaded
                if file_fingerprint(handle)["sha256"] != sha256:
                    raise changed_checkpoint(checkpoint, run_dir)
                handle.seek(0)
                weights = model_weights(load_tensors(handle, checkpoint))
            if fp16:
                weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
            shipped.fold(fold).mkdir(parents=True, exist_ok=True)
            torch.save(weights, shipped.fold(fold) / WEIGHTS_FILE)
            if experiment.folder.embedding(fold).is_file():
                shutil.copyfile(experiment.folder.embedding(fold), shipped.embedding(fold))


def write_decision(root: Path, record: dict, vocabulary: Vocabulary, decision_file: Path) -> None:
    """What prediction applies, where a run folder keeps it: the config predict ran with, the label vocabulary
    and the decision record (``decision_file``)."""
    shipped = RunFolder(root)
    shipped.config().write_text(yaml.safe_dump(record["config"], sort_keys=False))
    shipped.save_vocabulary(vocabulary)
    shutil.copyfile(decision_file, decision_path(root))


def copy_src(root: Path) -> None:
    """A copy of this pipeline's src package at ``root/src`` (what a Kaggle notebook imports)."""
    shutil.copytree(Path(__file__).resolve().parent, root / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))


def write_program(root: Path) -> None:
    """A copy of this pipeline's src package and the infer.py that imports it."""
    copy_src(root)
    (root / INFER_FILE).write_text(INFER_PY)


def bundle_manifest(cfg: Config, record: dict, vocabulary: Vocabulary, experiments: list[Experiment], fp16: bool,
                    wheels: dict[str, str]) -> dict:
    """What the bundle holds (manifest.json, less its size): experiments and folds, weights dtype, TTA, the
    decision, the wheels shipped (``wheels``) and what is not."""
    config = record["config"]
    return {
        "kind": BUNDLE_KIND, "bundle_id": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "competition": cfg.kaggle.competition, "data_format": config["data"]["format"],
        "labels": len(vocabulary), "weights_dtype": "float16" if fp16 else "float32",
        "experiments": [{"path": e.path, "run_dir": str(e.folder.root), "weight": e.weight,
                         "folds": [f for f, _, _ in e.folds], "backbone": e.cfg.model.backbone,
                         "image_size": e.cfg.data.image_size, "in_chans": e.cfg.model.in_chans, "loss": e.cfg.loss.name}
                        for e in experiments],
        "tta": config["predict"]["tta"], "tta_reduce": config["predict"]["tta_reduce"],
        "precision": config["train"]["precision"],
        "decision": {"strategy": record["strategy"], "decision": record_decision(record).describe(),
                     "refit_on_test": bool(record.get("refit_on_test")), "metric": record.get("metric"),
                     "oof_cross_fold": record.get("oof_cross_fold"), "oof_in_sample": record.get("oof_in_sample")},
        "wheels": wheels, "not_shipped": NOT_SHIPPED,
    }


def write_manifest(root: Path, manifest: dict, sample_submission: str, title: str, dataset_id: str) -> None:
    """The Kaggle side of the bundle (the notebook, the dataset's metadata) and, written last so that its size
    counts everything else, manifest.json."""
    (root / NOTEBOOK_FILE).write_text(json.dumps(notebook(
        manifest["competition"], sample_submission, manifest["bundle_id"], manifest["wheels"]), indent=1))
    title = f"{title} inference bundle"[:50]
    (root / METADATA_FILE).write_text(json.dumps(
        {"title": title if len(title) >= 6 else f"{title} model", "id": dataset_id,
         "licenses": [{"name": LICENSE}]}, indent=1) + "\n")
    manifest = manifest | {"size_bytes": _folder_size(root)}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def bundle(cfg: Config, out: str | Path | None = None, fp16: bool = False, wheels: bool = False,
           pip: Sequence[str] | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write the inference bundle of ``cfg``'s prediction to ``out`` (default ``bundles/<run folder name>``),
    staged as one folder and renamed into place; returns its folder. ``out`` is checked first
    (:func:`check_out`; ``force``: replace a folder that is not a bundle). ``pip``: the pip command for
    ``--wheels`` (default: this Python's)."""
    run_name = Path(cfg.run.dir).resolve().name
    out = Path(out) if out is not None else Path(BUNDLES_DIR) / run_name
    check_out(out, cfg, force)
    record, vocabulary = predicted_record(cfg)
    ensure_writable(out.parent, "the bundle")
    experiments = collect_weights(record, cfg.run.dir)
    dataset_id = cfg.kaggle.dataset or f"{PLACEHOLDER_OWNER}/{dataset_slug(run_name)}"

    def write(root: Path) -> None:
        write_weights(root, experiments, fp16, cfg.run.dir)
        write_decision(root, record, vocabulary, decision_path(cfg.run.dir))
        write_program(root)
        shipped = download_wheels(root / WHEELS_DIR, pip) if wheels else {}
        write_manifest(root, bundle_manifest(cfg, record, vocabulary, experiments, fp16, shipped),
                       record["config"]["data"]["sample_submission"], run_name, dataset_id)

    with Staging() as staging:
        staging.folder(out, write)
        staging.commit()
    if progress:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        weights_bytes = sum(p.stat().st_size for p in (out / EXPERIMENTS_DIR).rglob(WEIGHTS_FILE))
        print(f"wrote {out}/ ({manifest['size_bytes'] / 2**20:.1f} MiB; weights {weights_bytes / 2**20:.1f} MiB "
              f"{manifest['weights_dtype']} in {sum(len(e.folds) for e in experiments)} fold(s); decision "
              f"{record['strategy']}: {manifest['decision']['decision']})")
        if cfg.kaggle.dataset is None:
            note(f"note: {out / METADATA_FILE} names the dataset {dataset_id}: set kaggle.dataset=<you>/<slug> (or "
                 "edit the file) before `kaggle datasets create`")
        print(f"upload: kaggle datasets create -p {out} --dir-mode zip")
    return out


# -- predicting from a bundle (what infer.py runs) ---------------------------------------------------------------
def load_bundle(bundle_dir: str | Path) -> tuple[dict, dict, Vocabulary]:
    """(manifest, decision record, vocabulary) of a bundle folder; a PipelineError when it is not one."""
    bundle_dir = Path(bundle_dir)
    try:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{bundle_dir} is not an inference bundle ({MANIFEST_FILE}: {exc})") from None
    if manifest.get("kind") != BUNDLE_KIND:
        raise PipelineError(f"{bundle_dir / MANIFEST_FILE} is not the manifest of an inference bundle")
    vocabulary = RunFolder(bundle_dir).load_vocabulary()
    if vocabulary is None:
        raise PipelineError(f"{RunFolder(bundle_dir).vocabulary} not found: the bundle is incomplete")
    return manifest, read_record(bundle_dir), vocabulary


def bundled_weights(folder: RunFolder, fold: int) -> dict:
    """A fold's inference weights as the bundle stores them (float32 or float16)."""
    path = folder.fold(fold) / WEIGHTS_FILE
    return load_tensors(path, path, "bundle weights")


def predict_from_bundle(bundle_dir: str | Path, data_dir: str | Path, out: str | Path = "submission.csv",
                        device: str | None = None, precision: str | None = None, workers: int | None = None,
                        batch_size: int | None = None, progress: bool = True) -> Path:
    """The submission for the test set under ``data_dir`` from the bundle alone: each experiment's folds run under
    the configured TTA views and averaged, experiments combined with their weights, the recorded decision
    applied; validated and written atomically to ``out``."""
    bundle_dir = Path(bundle_dir)
    manifest, record, vocabulary = load_bundle(bundle_dir)
    changes = {"data.dir": str(data_dir), "data.extra": [], "data.cache_dir": None, "train.device": device,
               "train.precision": precision, "train.num_workers": workers, "predict.batch_size": batch_size}
    cfg = override(load_config(RunFolder(bundle_dir).config()), **{k: v for k, v in changes.items()
                                                             if v is not None or k == "data.cache_dir"})
    check_views(cfg.predict.tta)
    ensure_writable(Path(out).resolve().parent, "the submission")
    torch_device = resolve_device(cfg.train.device)
    test_table = load_test_table(cfg.data)

    per_run = []
    for experiment in manifest["experiments"]:
        folder = RunFolder(bundle_dir / experiment["path"])
        run_cfg = folder.load_config()
        test_set = RGBYDataset(test_table, cfg.data.num_classes, run_cfg.data.image_size,
                               channels=run_cfg.model.in_chans)
        fold_scores = []
        for fold, model in fold_networks(run_cfg, ((fold, bundled_weights(folder, fold))
                                                   for fold in experiment["folds"]), torch_device):
            scores = score_dataset(cfg, run_cfg, model, test_set, folder.output_scorer(run_cfg, fold), torch_device,
                                   f"{Path(experiment['path']).name} fold {fold}", progress)
            fold_scores.append(require_finite(scores[:], f"{folder.fold(fold) / WEIGHTS_FILE}: test scores"))
        per_run.append((experiment["weight"], combine_scores(fold_scores, fold_mean)))
    # predict's own arithmetic (mean over folds, then the weighted mean over experiments), so the scores, and
    # with them the submission, are predict's to the bit on the same machine.
    test_scores = combine_scores([scores for _, scores in per_run], partial(weighted_mean, [w for w, _ in per_run]))
    predicted = apply_recorded_overrides(record, apply_record(record, test_scores, cfg), test_table["Id"], vocabulary)
    submission = make_submission(test_table, predicted, vocabulary, submission_columns(cfg.data),
                                 label_separator(cfg.data))
    written = write_atomic(out, lambda tmp: submission.to_csv(tmp, index=False))
    if progress:
        print(f"wrote {written} ({len(submission)} rows, {predicted.sum(axis=1).mean():.2f} labels per image; "
              f"{record['strategy']}, {manifest['weights_dtype']} weights)")
    return written


def infer_main(bundle_dir: Path) -> None:
    """infer.py's command line."""
    parser = argparse.ArgumentParser(description="Predict the test set with this inference bundle.")
    parser.add_argument("--data", required=True, help="the competition's data folder (e.g. /kaggle/input/<slug>)")
    parser.add_argument("--out", default="submission.csv", help="the submission to write (default submission.csv)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the bundle's train.device")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="default: the bundle's train.precision")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the bundle's train.num_workers)")
    parser.add_argument("--batch-size", type=int, help="default: the bundle's predict.batch_size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    run_cli(lambda: predict_from_bundle(bundle_dir, args.data, args.out, args.device, args.precision, args.workers,
                                        args.batch_size, progress=not args.quiet))


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"the bundle folder (default {BUNDLES_DIR}/<run folder name>)")
    parser.add_argument("--force", action="store_true", help="replace an --out folder that is not a bundle (never "
                        "a run folder, the data folder or the checkout)")
    parser.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--wheels", action="store_true", help="add wheels of the pinned packages a Kaggle image "
                        f"lacks ({', '.join(WHEELS)}); needs the package index")
    args = parser.parse_args()
    bundle(config_from_args(args), args.out, fp16=args.fp16, wheels=args.wheels, force=args.force)


if __name__ == "__main__":
    run_cli(main)
