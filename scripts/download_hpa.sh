#!/usr/bin/env bash
# Download the Human Protein Atlas 2018 competition data into input/hpa with the official kaggle CLI.
# Needs Kaggle credentials (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY) and the
# competition's rules accepted on its Kaggle page.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPETITION=human-protein-atlas-image-classification
DEST=${1:-input/hpa}
if [ ! -f "${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}/kaggle.json" ] && { [ -z "${KAGGLE_USERNAME:-}" ] || [ -z "${KAGGLE_KEY:-}" ]; }; then
  echo "error: no Kaggle credentials. Create an API token on kaggle.com (Settings -> API), save it as" >&2
  echo "       ~/.kaggle/kaggle.json (chmod 600), or export KAGGLE_USERNAME and KAGGLE_KEY." >&2
  exit 2
fi
bash scripts/setup.sh
[ -x .venv/bin/kaggle ] || .venv/bin/python -m pip install -q kaggle
mkdir -p "$DEST"
.venv/bin/kaggle competitions download -c "$COMPETITION" -p "$DEST"
echo "unpacking into $DEST (about 20 GB)"
.venv/bin/python -m zipfile -e "$DEST/$COMPETITION.zip" "$DEST"
rm "$DEST/$COMPETITION.zip"
.venv/bin/python -m src.validate --config configs/hpa_nasnet512.yaml data.dir="$DEST"
