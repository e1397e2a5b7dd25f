#!/usr/bin/env bash
# The main job on the embedded demo data, from a fresh clone:
# set up .venv, write the synthetic dataset, make folds, train every fold, predict -> submissions/submission.csv
# Idempotent: the environment and the demo data are reused; training (train.overwrite=true: each fold
# again from scratch) and prediction run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CONFIG=configs/demo.yaml
PY=.venv/bin/python
[ -f input/demo/train.csv ] || "$PY" -m src.demo --out input/demo
"$PY" -m src.folds --config "$CONFIG" "$@"
bash scripts/train_all_folds.sh train.overwrite=true "$@"
"$PY" -m src.predict --config "$CONFIG" "$@"
