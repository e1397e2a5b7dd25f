"""The inference bundle (src.bundle): built from a tiny trained and predicted run, copied away from the checkout,
it predicts offline exactly the submission ``src.predict`` wrote."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import src.bundle
from src.bundle import WHEELS, bundle, collect_weights, predict_from_bundle
from src.checkpoint import load_checkpoint
from src.cli import run_cli
from src.config import PipelineError, override
from src.decision_record import decision_path
from src.folds import make_folds
from src.predict import predict
from src.run_folder import RunFolder
from src.train import train
from tests.conftest import REPO_ROOT, tiny_config

# pip stand-in for --wheels: writes an empty wheel file per requested pin into --dest.
FAKE_PIP = """import sys
args = sys.argv[1:]
dest = args[args.index("--dest") + 1]
for spec in (a for a in args if "==" in a):
    name, version = spec.split("==")
    open(f"{dest}/{name.replace('-', '_')}-{version}-py3-none-any.whl", "wb").close()
"""

NO_NETWORK = """import socket


def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")


socket.socket.connect = _refuse
socket.create_connection = _refuse
"""


@pytest.fixture(scope="module")
def predicted(tiny_data, tmp_path_factory):
    """Both folds of the tiny config trained, predicted with two TTA views: a fold ensemble with TTA."""
    work = tmp_path_factory.mktemp("bundled")
    cfg = tiny_config(tiny_data, work, "predict.tta=[identity,flip]")
    make_folds(cfg, progress=False)
    for fold in range(cfg.folds.n_splits):
        train(cfg, fold, progress=False)
    predict(cfg, progress=False)
    return cfg


def offline(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``command`` without network: in a new network namespace where unprivileged ones are allowed, else
    with a sitecustomize that makes every socket connection fail."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-rn", *command]
    else:
        guard = cwd.parent / "no_network"
        guard.mkdir(exist_ok=True)
        (guard / "sitecustomize.py").write_text(NO_NETWORK)
        env = env | {"PYTHONPATH": str(guard)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bundle_predicts_offline_the_very_submission_predict_wrote(predicted, tmp_path):
    out = bundle(predicted, tmp_path / "bundle", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weights_dtype"] == "float32" and manifest["tta"] == ["identity", "flip"]
    assert [e["folds"] for e in manifest["experiments"]] == [[0, 1]]
    metadata = json.loads((out / "dataset-metadata.json").read_text())
    assert set(metadata) == {"title", "id", "licenses"} and metadata["id"].endswith("/run-bundle")
    weights = torch.load(out / manifest["experiments"][0]["path"] / "fold0" / "weights.pt", weights_only=True)
    assert "head.weight" in weights and not any(key.startswith(("optimizer", "module.")) for key in weights)
    assert not list(out.rglob("*.pt.*")) and not list(out.rglob("oof*")) and not list(out.rglob("__pycache__"))
    assert (out / "src" / "predict.py").read_bytes() == (REPO_ROOT / "src" / "predict.py").read_bytes()
    notebook = json.loads((out / "inference.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            compile(cell["source"], "inference.ipynb", "exec")  # plain Python, no shell magics
    nbformat = pytest.importorskip("nbformat")  # installed with the kaggle CLI
    nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))

    copy = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(out, copy)
    # No PYTHONPATH, the copy as working directory, one torch thread as in this process: the checkout's src cannot
    # be imported, and the scores are computed the same way to the bit.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    checkout = subprocess.run([sys.executable, "-c", "import src"], cwd=tmp_path, env=env, capture_output=True)
    assert checkout.returncode != 0  # the checkout is not importable from outside it
    result = offline([sys.executable, "infer.py", "--data", predicted.data.dir, "--out", "submission.csv"], copy, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 1" in result.stderr  # the progress bar of each fold
    assert (copy / "submission.csv").read_bytes() == Path(predicted.submission.path).read_bytes()


def test_fp16_bundle_halves_the_weights_and_still_predicts(predicted, tmp_path):
    full = bundle(predicted, tmp_path / "fp32", progress=False)
    half = bundle(predicted, tmp_path / "fp16", fp16=True, progress=False)
    assert json.loads((half / "manifest.json").read_text())["weights_dtype"] == "float16"
    weights = torch.load(half / "experiments" / "0-run" / "fold1" / "weights.pt", weights_only=True)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    size = lambda root: sum(p.stat().st_size for p in root.rglob("weights.pt"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    written = predict_from_bundle(half, predicted.data.dir, tmp_path / "s.csv", progress=False)
    lines = written.read_text().splitlines()
    assert lines[0] == "Id,Predicted" and len(lines) == 13


def test_wheels_are_the_pinned_versions_and_the_notebook_installs_them(predicted, tmp_path):
    pip = tmp_path / "fake_pip.py"
    pip.write_text(FAKE_PIP)
    out = bundle(predicted, tmp_path / "bundle", wheels=True, pip=[sys.executable, str(pip)], progress=False)
    pins = dict(line.split("==") for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    shipped = json.loads((out / "manifest.json").read_text())["wheels"]
    assert shipped == {name: pins[name] for name in WHEELS} and "torch" not in shipped
    assert sorted(p.name for p in (out / "wheels").iterdir()) == sorted(
        f"{name.replace('-', '_')}-{version}-py3-none-any.whl" for name, version in shipped.items())
    notebook = (out / "inference.ipynb").read_text()
    assert "--no-index" in notebook and f"timm=={pins['timm']}" in notebook


def test_bundle_refuses_a_config_that_did_not_make_the_prediction(predicted, tmp_path):
    with pytest.raises(PipelineError, match=r"another config than this one \(predict.tta"):
        bundle(override(predicted, **{"predict.tta": ["identity"]}), tmp_path / "bundle", progress=False)
    assert not (tmp_path / "bundle").exists()


def test_a_label_embedding_run_with_the_rate_strategy_predicts_the_same_from_its_bundle(tiny_data, tmp_path):
    """The fold's label vectors travel with its weights, and ``rate`` is fitted again on the bundle's test scores
    from the recorded label rates: the same submission as predict's."""
    cfg = tiny_config(tiny_data, tmp_path, "loss.name=label_embedding", "loss.embedding_dim=4",
                      "predict.threshold=rate", "predict.folds=[0]", "predict.tta=[identity]")
    make_folds(cfg, progress=False)
    train(cfg, 0, progress=False)
    predict(cfg, progress=False)
    out = bundle(cfg, tmp_path / "bundle", progress=False)
    assert (out / "experiments" / "0-run" / "fold0" / "label_embedding.npz").is_file()
    assert json.loads((out / "decision.json").read_text())["refit_on_test"] is True
    written = predict_from_bundle(out, cfg.data.dir, tmp_path / "from_bundle.csv", progress=False)
    assert written.read_bytes() == Path(cfg.submission.path).read_bytes()


def tree_state(path: Path) -> dict:
    """Every entry under ``path`` (the path itself included, links not followed): its type, size, mtime and, for a
    file, its bytes: what a refused --out must leave as it was."""
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    state = {}
    for entry in entries:
        st = entry.lstat()
        content = entry.read_bytes() if entry.is_file() and not entry.is_symlink() else os.readlink(entry) \
            if entry.is_symlink() else None
        state[str(entry.relative_to(path))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return state


def user_folder(parent: Path) -> Path:
    """A folder of a user's files under ``parent``."""
    folder = parent / "notes"
    folder.mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work")
    return folder


def linked_user_folder(parent: Path) -> Path:
    """A symbolic link to a folder of a user's files."""
    (parent / "link").symlink_to(user_folder(parent))
    return parent / "link"


# Each case: (--out, --force); those the bundle may never replace are tried with --force.
OUT_CASES = {
    "the run folder": lambda cfg, tmp: (Path(cfg.run.dir), True),
    "inside the run folder": lambda cfg, tmp: (Path(cfg.run.dir) / "fold0", True),
    "a user folder": lambda cfg, tmp: (user_folder(tmp), False),
    "a file": lambda cfg, tmp: (user_folder(tmp) / "thesis.txt", True),
    "a link to a user folder": lambda cfg, tmp: (linked_user_folder(tmp), True),
    "the data folder": lambda cfg, tmp: (Path(cfg.data.dir), True),
    "the checkout": lambda cfg, tmp: (src.bundle.REPO_ROOT, True),
    "an ancestor of the run folder": lambda cfg, tmp: (Path(cfg.run.dir).parent, True),
}
WHY = {"the run folder": "is the run folder", "inside the run folder": "is inside the run folder",
       "a user folder": "holds files this command did not make", "a file": "is a file, not a folder",
       "a link to a user folder": "is a symbolic link", "the data folder": "is the data folder",
       "the checkout": "is the checkout", "an ancestor of the run folder": "holds the run folder"}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_an_out_the_bundle_did_not_make_is_refused_before_any_work_and_left_untouched(predicted, tmp_path, case,
                                                                                      monkeypatch):
    # A stand-in checkout: were the refusal ever to fail, the real one is not what gets replaced.
    fake_checkout = user_folder(tmp_path / "checkout")
    monkeypatch.setattr(src.bundle, "REPO_ROOT", fake_checkout)
    out, force = OUT_CASES[case](predicted, tmp_path)
    watched = [out, Path(predicted.run.dir), Path(predicted.data.dir), fake_checkout]
    before = [tree_state(path) for path in watched]
    with pytest.raises(PipelineError, match=f"^--out {re.escape(str(out))} .*{WHY[case]}"):
        bundle(predicted, out, progress=False, force=force)
    assert [tree_state(path) for path in watched] == before
    assert not list(out.parent.glob("*.tmp"))


def test_a_bundle_folder_an_empty_folder_and_with_force_a_user_folder_are_replaced(predicted, tmp_path):
    first = bundle(predicted, tmp_path / "bundle", progress=False)
    (first / "stale.txt").write_text("from the previous bundle")
    again = bundle(predicted, first, progress=False)  # recognised by its manifest.json
    assert again == first and not (again / "stale.txt").exists() and (again / "manifest.json").is_file()
    (tmp_path / "empty").mkdir()
    assert (bundle(predicted, tmp_path / "empty", progress=False) / "manifest.json").is_file()
    forced = bundle(predicted, user_folder(tmp_path), progress=False, force=True)
    assert sorted(p.name for p in forced.iterdir()) == sorted(p.name for p in first.iterdir() if p.name != "wheels")


def test_a_checkpoint_whose_bytes_changed_with_its_mtime_kept_is_not_bundled(predicted, tmp_path):
    """``cp -p``/``rsync -a``/``touch -r``: the time says nothing changed, the content does."""
    record = json.loads(decision_path(predicted.run.dir).read_text())
    folder = RunFolder(predicted.run.dir)
    assert record["runs"][0]["checkpoints"] == [
        {"fold": fold, "size": folder.checkpoint(fold, "best").stat().st_size,
         "sha256": hashlib.sha256(folder.checkpoint(fold, "best").read_bytes()).hexdigest()} for fold in (0, 1)]
    path = folder.checkpoint(1, "best")
    original, stat = path.read_bytes(), path.stat()
    # One byte of a weight flipped in place: a checkpoint torch still loads, of the same size, its mtime put back.
    at = original.find(torch.load(path, weights_only=True)["model"]["head.weight"].numpy().tobytes()[:64])
    try:
        with open(path, "r+b") as handle:
            handle.seek(at)
            handle.write(bytes([original[at] ^ 0x40]))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert at > 0 and path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
        with pytest.raises(PipelineError, match=f"^{re.escape(str(path))} changed after the prediction"):
            bundle(predicted, tmp_path / "bundle", progress=False)
        assert not (tmp_path / "bundle").exists()
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for run in record["runs"]:  # a record from before fingerprints: one line saying what to run
        del run["checkpoints"]
    with pytest.raises(PipelineError, match="records no fingerprint .* run `python -m src.predict` again"):
        collect_weights(record, predicted.run.dir)


class Payload:
    """Any class: a pickle naming it runs code when loaded without weights_only."""


def test_pickled_objects_in_bundle_weights_get_the_checkpoint_one_line(predicted, tmp_path, capsys):
    out = bundle(predicted, tmp_path / "bundle", progress=False)
    weights = out / "experiments" / "0-run" / "fold0" / "weights.pt"
    torch.save({"head.weight": Payload()}, weights)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": Payload()}, checkpoint)
    errors = []
    for path, load in ((weights, lambda: predict_from_bundle(out, predicted.data.dir, tmp_path / "s.csv",
                                                             progress=False)),
                       (checkpoint, lambda: load_checkpoint(checkpoint))):
        with pytest.raises(SystemExit) as exited:
            run_cli(load)
        stderr = capsys.readouterr().err
        assert exited.value.code == 2 and "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
        errors.append(stderr.replace(str(path), "<file>"))
    assert errors[0] == errors[1] and "pickled Python object (tests.test_bundle.Payload)" in errors[0]
    assert "weights_only=False" not in errors[0]
