"""The inference bundle (src.bundle): built from a tiny trained and predicted run, copied away from the checkout,
it predicts offline exactly the submission ``src.predict`` wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.bundle import WHEELS, bundle, predict_from_bundle
from src.config import PipelineError, override
from src.folds import make_folds
from src.predict import predict
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
