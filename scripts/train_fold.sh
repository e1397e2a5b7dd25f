#!/usr/bin/env bash
# Train one fold:  bash scripts/train_fold.sh N [--config FILE] [key=value ...]
# The config is $CONFIG, else configs/hpa_nasnet512.yaml; a --config argument wins over both.
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
exec "$PY" -m src.train --fold "$fold" --config "${CONFIG:-configs/hpa_nasnet512.yaml}" "$@"
