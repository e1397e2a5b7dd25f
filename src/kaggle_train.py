"""The training notebook: a fold trained inside Kaggle notebooks, one session after another, to the weights one
uninterrupted run gives.

    python -m src.kaggle_train [--config FILE] [key=value ...] [--out DIR]

Writes a folder to upload as a Kaggle dataset (default ``bundles/<run folder name>-training``)::

    dataset-metadata.json      title, id (kaggle.dataset) and licence: `kaggle datasets create -p DIR -r zip`
    manifest.json              what it is: the kit's id, the competition, the run folder's name, the packed sizes
    config.yaml                the resolved config (the notebook points its paths at /kaggle/input and /kaggle/working)
    folds.csv                  the folds file (folds.path): every session and every fold split the data alike
    requirements-kaggle.txt    the pins a Kaggle image lacks (never torch or torchvision)
    src/                       a copy of this pipeline's src package (the notebook imports it)
    train.ipynb                the notebook

The notebook (nbformat 4; its first code cell holds the parameters: fold, ``train.time_limit``, extra overrides)
finds under ``/kaggle/input`` this kit, the competition's data, the packed cache of ``python -m src.pack`` (a
dataset of ``data.cache_dir``'s files, optional: without it the images are read) and the output of the previous
session of this notebook (added as an input), copies that session's run folder to ``/kaggle/working``, installs
what the image lacks at the pinned versions (``pip --no-deps``, only where the version differs) and trains the fold
with ``train.resume=true`` and ``train.time_limit``: the session stops cleanly before its limit and the next one
continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from src.bundle import (
    BUNDLES_DIR,
    LICENSE,
    METADATA_FILE,
    PLACEHOLDER_OWNER,
    REPO_ROOT,
    copy_src,
    dataset_slug,
    pinned_versions,
)
from src.cli import cli_parser, config_from_args, run_cli
from src.config import Config, PipelineError
from src.files import Staging, ensure_writable, save_config
from src.folds import read_folds_file
from src.progress import note

KIT_KIND = "multilabel-pipeline training kit"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
FOLDS_FILE = "folds.csv"
REQUIREMENTS_FILE = "requirements-kaggle.txt"
NOTEBOOK_FILE = "train.ipynb"
# Kaggle ends a notebook session after 12 hours (GPU and CPU sessions, at the time of writing): the default time
# limit leaves one for the install, the copy of the previous session's run folder, and saving the output.
DEFAULT_TIME_LIMIT = "11h"


def pinned_for_kaggle(requirements: Path = REPO_ROOT / REQUIREMENTS_FILE) -> dict[str, str]:
    """``{package: version}`` of requirements-kaggle.txt (read as the bundle reads requirements.txt)."""
    return pinned_versions(requirements)


def cell(kind: str, number: int, source: str, tags: tuple[str, ...] = ()) -> dict:
    """One nbformat 4 cell."""
    body = {"cell_type": kind, "id": f"cell-{number}", "metadata": {"tags": list(tags)} if tags else {},
            "source": source.strip("\n")}
    return body | ({"execution_count": None, "outputs": []} if kind == "code" else {})


def notebook(cfg: Config, kit_id: str) -> dict:
    """``train.ipynb``: parameters, finding the inputs, the install, the previous session's run folder, training."""
    data, run_name = cfg.data, Path(cfg.run.dir).name
    parameters = f'''
from pathlib import Path

FOLD = 0
# Stop cleanly before this (train.time_limit, from the start of training): the session's limit less the install,
# the copy of the previous session's run folder and saving the output.
TIME_LIMIT = {DEFAULT_TIME_LIMIT!r}
OVERRIDES = []  # more config overrides, e.g. ["train.batch_size=16"] (python -m src.doctor --estimate)
INPUT = Path("/kaggle/input")
WORKING = Path("/kaggle/working")
'''
    find = f'''
import json

KIT_ID = {kit_id!r}
COMPETITION = {cfg.kaggle.competition!r}
RUN_NAME = {run_name!r}


def first(patterns, where=INPUT):
    """The first path matching one of ``patterns`` under ``where``, one to three folders deep (None: none)."""
    for pattern in patterns:
        for depth in ("*/", "*/*/", "*/*/*/"):
            for found in sorted(where.glob(depth + pattern)):
                return found
    return None


def find_kit() -> Path:
    """This kit: the attached dataset whose manifest.json has its id."""
    for depth in ("*/", "*/*/", "*/*/*/"):
        for manifest in sorted(INPUT.glob(depth + "manifest.json")):
            try:
                if json.loads(manifest.read_text()).get("kit_id") == KIT_ID:
                    return manifest.parent
            except (OSError, ValueError):
                continue
    raise FileNotFoundError(f"no training kit {{KIT_ID}} under {{INPUT}}: add its dataset as an input")


KIT = find_kit()
found = INPUT / COMPETITION if (INPUT / COMPETITION / {data.train_csv!r}).is_file() else None
DATA = found or getattr(first([{data.train_csv!r}]), "parent", None)
if DATA is None:
    raise FileNotFoundError(f"no {{COMPETITION}} data under {{INPUT}}: add the competition as an input")
# The packed cache (optional): a dataset holding python -m src.pack's files.
CACHE = getattr(first(["train-{data.image_size}px-*.json"]), "parent", None)
# The previous session's output (this notebook's output added as an input), if any: the run folder holding this
# fold's last.pt, else one holding another fold's (its folds travel on in this session's output).
PREVIOUS = first([f"{{RUN_NAME}}/fold{{FOLD}}/last.pt", f"{{RUN_NAME}}/fold*/last.pt"])
print("kit:", KIT)
print("data:", DATA)
print("packed cache:", CACHE or "none (the images are read)")
print("previous session:", PREVIOUS.parents[1] if PREVIOUS else "none (training starts)")
'''
    install = '''
import subprocess
import sys
from importlib import metadata


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# The pins the image lacks, at their versions; --no-deps: never a torch other than the image's.
pins = [line.split("#")[0].strip() for line in (KIT / "requirements-kaggle.txt").read_text().splitlines()]
missing = [pin for pin in pins if pin and installed(pin.split("==")[0]) != pin.split("==")[1]]
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing], check=True)
print("installed:", missing or "nothing (the image has every pin)")
'''
    prepare = f'''
import shutil
import tempfile

RUN = WORKING / RUN_NAME
if PREVIOUS is not None and not (RUN / f"fold{{FOLD}}" / "last.pt").is_file():
    # Kaggle's inputs are read-only: the run folder continues in /kaggle/working, this session's output.
    shutil.copytree(PREVIOUS.parents[1], RUN, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock", "*.tmp"))
data_dir = DATA
if CACHE is not None:
    # With the packed cache the images are not needed: the label files alone, in a folder without the image
    # folders (outside the output), and the cache is used as packed (src.pack: a cache uploaded without its images).
    data_dir = Path(tempfile.mkdtemp(prefix="labels-"))
    for name in ({data.train_csv!r}, {data.sample_submission!r}):
        if (DATA / name).is_file():
            (data_dir / name).symlink_to(DATA / name)
'''
    train = '''
import sys

sys.path.insert(0, str(KIT))  # the kit's own copy of the pipeline

from src.config import load_config  # noqa: E402
from src.train import train  # noqa: E402

cfg = load_config(KIT / "config.yaml", [
    f"data.dir={data_dir}", f"data.cache_dir={CACHE if CACHE is not None else 'null'}",
    f"folds.path={KIT / 'folds.csv'}", f"run.dir={RUN}", "train.resume=true",
    f"train.time_limit={TIME_LIMIT if TIME_LIMIT else 'null'}", *OVERRIDES])
result = train(cfg, FOLD)
if result.get("stopped_early"):
    print(f"fold {FOLD} stopped at optimizer step {result['steps']} to keep within the session. Save this version; "
          "in the next one add this notebook's output as an input and run it again: it continues from there.")
else:
    print(f"fold {FOLD} is trained: {RUN}/fold{FOLD}/ (best.pt, oof scores, history)")
'''
    intro = (f"# Training fold by fold on Kaggle\n\nAdd as inputs: this kit's dataset, the `{cfg.kaggle.competition}` "
             "competition data, optionally the packed cache (a dataset of `python -m src.pack`'s files), and from "
             "the second session on this notebook's own output. Set the parameters below (fold, time limit) and run "
             "all: a session stops cleanly before `TIME_LIMIT`, and the next one, with the previous output added, "
             "continues the fold exactly where it stopped. Keep Kaggle's own torch: only what the image lacks is "
             "installed.")
    sources = [("markdown", intro, ()), ("code", parameters, ("parameters",)), ("code", find, ()),
               ("code", install, ()), ("code", prepare, ()), ("code", train, ())]
    return {"cells": [cell(kind, i, source, tags) for i, (kind, source, tags) in enumerate(sources)],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def kit_manifest(cfg: Config, folds_bytes: bytes) -> dict:
    """manifest.json: the kit's id (from the config and the folds), the competition, the run folder's name."""
    config = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return {"kind": KIT_KIND, "kit_id": hashlib.sha256(config + folds_bytes).hexdigest()[:16],
            "competition": cfg.kaggle.competition, "run_name": Path(cfg.run.dir).name,
            "image_size": cfg.data.image_size, "backbone": cfg.model.backbone, "folds": cfg.folds.n_splits,
            "pins": pinned_for_kaggle()}


def write_kit(cfg: Config, out: str | Path | None = None, progress: bool = True) -> Path:
    """Write the training kit of ``cfg`` to ``out`` (default ``bundles/<run folder name>-training``), staged as one
    folder; returns it. Needs the folds file; a config with ``data.extra`` sources is refused (the notebook finds
    the competition's own data only)."""
    if cfg.data.extra:
        raise PipelineError("data.extra: the training notebook reads the competition's own data only; train with "
                            "data.extra=[] on Kaggle, or where the extra sources are")
    read_folds_file(cfg)  # a missing or broken folds file: the error that says how to make it
    if cfg.model.pretrained is not False:
        what = ("=true fetches timm's weights: turn the notebook's internet on, or" if cfg.model.pretrained is True
                else f"={cfg.model.pretrained} is a file on this machine:")
        note(f"note: model.pretrained{what} save the weights with `python -m src.weights`, add the file as a "
             "dataset and put model.pretrained=/kaggle/input/<dataset>/<file> in the notebook's OVERRIDES")
    folds_bytes = Path(cfg.folds.path).read_bytes()
    run_name = Path(cfg.run.dir).resolve().name
    out = Path(out) if out is not None else Path(BUNDLES_DIR) / f"{run_name}-training"
    ensure_writable(out.parent, "the training kit")
    manifest = kit_manifest(cfg, folds_bytes)
    dataset_id = cfg.kaggle.dataset or f"{PLACEHOLDER_OWNER}/{dataset_slug(run_name + '-training')}"

    def write(root: Path) -> None:
        save_config(cfg, root / CONFIG_FILE)
        (root / FOLDS_FILE).write_bytes(folds_bytes)
        shutil.copyfile(REPO_ROOT / REQUIREMENTS_FILE, root / REQUIREMENTS_FILE)
        copy_src(root)
        (root / NOTEBOOK_FILE).write_text(json.dumps(notebook(cfg, manifest["kit_id"]), indent=1) + "\n")
        title = f"{run_name} training kit"[:50]
        (root / METADATA_FILE).write_text(json.dumps({"title": title, "id": dataset_id,
                                                      "licenses": [{"name": LICENSE}]}, indent=1) + "\n")
        (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

    with Staging() as staging:
        staging.folder(out, write)
        staging.commit()
    if progress:
        print(f"wrote {out}/ (the training notebook {NOTEBOOK_FILE}, the config, the folds and src)")
        print(f"upload: kaggle datasets create -p {out} --dir-mode zip; then a notebook from {out / NOTEBOOK_FILE} "
              "with this dataset, the competition and the packed cache as inputs")
    return out


def main() -> None:
    parser = cli_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"the kit folder (default {BUNDLES_DIR}/<run folder name>-training)")
    args = parser.parse_args()
    write_kit(config_from_args(args), args.out)


if __name__ == "__main__":
    run_cli(main)
