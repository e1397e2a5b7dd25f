#!/usr/bin/env bash
# Train every fold in turn:  bash scripts/train_all_folds.sh [--config FILE] [key=value ...]
# Same config rules as train_fold.sh; folds.n_splits of the resolved config says how many.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
n_splits=$("$PY" -m src.cli --config "${CONFIG:-configs/hpa_nasnet512.yaml}" "$@" --get folds.n_splits)
for ((fold = 0; fold < n_splits; fold++)); do
  bash scripts/train_fold.sh "$fold" "$@"
done
