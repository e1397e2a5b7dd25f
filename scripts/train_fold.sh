#!/usr/bin/env bash
# Train one fold:  bash scripts/train_fold.sh N [--config FILE] [key=value ...]
# The config is $CONFIG, else configs/hpa_nasnet512.yaml; a --config argument wins over both.
# Without a folds file it runs the folds stage first (saying so); training itself never does.
#
# Processes: $NPROC, else train.nproc ("auto": the number of visible GPUs, 1 on a CPU). More than one
# launches torchrun (DDP, one process per GPU; gloo on CPU). Several machines: set NNODES, NODE_RANK and
# RDZV_ENDPOINT (host:port of node 0) on every node, e.g.
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 NPROC=8 bash scripts/train_fold.sh 0
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
values=$("$PY" -m src.cli --config "$config" "$@" --get folds.path --get train.nproc)  # one start-up
folds_path=$(sed -n 1p <<< "$values")
config_nproc=$(sed -n 2p <<< "$values")
if [ ! -f "$folds_path" ]; then
  echo "no folds file $folds_path: running the folds stage first (python -m src.folds)"
  "$PY" -m src.folds --config "$config" "$@"
fi
nproc=${NPROC:-$config_nproc}
if [ "$nproc" = "auto" ]; then
  nproc=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if ! [[ $nproc =~ ^[0-9]+$ ]] || [ "$nproc" -lt 1 ]; then
  echo "error: NPROC / train.nproc must be a positive number or auto, got '$nproc'" >&2
  exit 2
fi
if [ "$nproc" -eq 1 ] && [ -z "${NNODES:-}" ]; then
  exec "$PY" -m src.train --fold "$fold" --config "$config" "$@"
fi
if [ -n "${NNODES:-}" ]; then
  launch=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --rdzv_backend=c10d
          --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of node 0)}")
else
  launch=(--standalone)
fi
exec "$PY" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$nproc" \
  -m src.train --fold "$fold" --config "$config" "$@"
