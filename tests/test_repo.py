"""The repository itself: CI wiring, workflow syntax, lint, and the shell entry points."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT, TINY_CLASSES

VENV_BIN = f"{sys.prefix}/bin"


def readme_test_command() -> str:
    """The README's test command: the line right after the '# run the whole test suite' comment."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^(bash scripts/test\.sh)\s+# .*test", text, re.MULTILINE)
    assert match, "README names no test command"
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_test_command()
    lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert lines == [command]
    workflow = (REPO_ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert f"run: {command}" in workflow


def test_github_workflow_is_valid():
    result = subprocess.run([f"{VENV_BIN}/check-jsonschema", "--builtin-schema", "vendor.github-workflows",
                             str(REPO_ROOT / ".github" / "workflows" / "ci.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_lint_clean():
    result = subprocess.run([f"{VENV_BIN}/ruff", "check", "src", "tests", "benchmarks"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_train_fold_script_needs_a_fold():
    result = subprocess.run(["bash", "scripts/train_fold.sh"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.slow
def test_train_fold_script_writes_everything_with_an_offline_wandb_run(tiny_data, tmp_path):
    """`bash scripts/train_fold.sh 0` end to end: checkpoints, OOF, history, resolved config, W&B run."""
    run_dir = tmp_path / "run"
    overrides = [f"data.dir={tiny_data}", f"data.num_classes={TINY_CLASSES}", "data.image_size=32",
                 f"folds.path={tmp_path / 'folds.csv'}", "folds.n_splits=2", "folds.rare_classes=warn",
                 "model.backbone=test_resnet", "train.epochs=1", "train.batch_size=8", "train.num_workers=0",
                 "train.device=cpu", f"run.dir={run_dir}", "wandb.mode=offline"]
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "CONFIG": "configs/demo.yaml", "WANDB_SILENT": "true",
           "HOME": str(tmp_path)}
    result = subprocess.run(["bash", "scripts/train_fold.sh", "0", *overrides], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fold_dir = run_dir / "fold0"
    for name in ("best.pt", "last.pt", "oof.csv", "history.csv", "config.yaml"):
        assert (fold_dir / name).is_file(), name
    assert (run_dir / "config.yaml").read_text() == (fold_dir / "config.yaml").read_text()
    assert "  dir: " + str(tiny_data) in (run_dir / "config.yaml").read_text()
    assert len(pd.read_csv(fold_dir / "history.csv")) == 1
    offline_runs = list((fold_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1 and offline_runs[0].stat().st_size > 0
    assert "wandb sync" in result.stdout
