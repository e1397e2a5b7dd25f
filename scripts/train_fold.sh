#!/usr/bin/env bash
# Train one fold:  bash scripts/train_fold.sh N [--config FILE] [key=value ...]
# The config is $CONFIG, else configs/hpa_nasnet512.yaml; a --config argument wins over both.
# Without a folds file it runs the folds stage first (saying so); training itself never does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: bash scripts/train_fold.sh FOLD [--config FILE] [key=value ...]" >&2
  exit 2
fi
fold=$1
shift
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
config=${CONFIG:-configs/hpa_nasnet512.yaml}
folds_path=$("$PY" -m src.config --config "$config" "$@" --get folds.path)
if [ ! -f "$folds_path" ]; then
  echo "no folds file $folds_path: running the folds stage first (python -m src.folds)"
  "$PY" -m src.folds --config "$config" "$@"
fi
exec "$PY" -m src.train --fold "$fold" --config "$config" "$@"
