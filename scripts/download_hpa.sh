#!/usr/bin/env bash
# Download the Human Protein Atlas 2018 competition data into input/hpa with the official kaggle CLI.
# Needs Kaggle credentials (an API token: ~/.kaggle/access_token or KAGGLE_API_TOKEN; or the legacy
# ~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY) and the competition's rules accepted on its page.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPETITION=human-protein-atlas-image-classification
DEST=${1:-input/hpa}
kaggle_dir=${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}
if [ ! -f "$kaggle_dir/access_token" ] && [ -z "${KAGGLE_API_TOKEN:-}" ] && [ ! -f "$kaggle_dir/kaggle.json" ] \
   && { [ -z "${KAGGLE_USERNAME:-}" ] || [ -z "${KAGGLE_KEY:-}" ]; }; then
  echo "error: no Kaggle credentials. Create an API token on kaggle.com (Settings -> API) and run" >&2
  echo "       'kaggle auth login', or save it as $kaggle_dir/access_token (or export KAGGLE_API_TOKEN);" >&2
  echo "       a legacy key: $kaggle_dir/kaggle.json (chmod 600), or KAGGLE_USERNAME and KAGGLE_KEY." >&2
  exit 2
fi
bash scripts/setup.sh  # installs the pinned kaggle CLI with requirements.txt
mkdir -p "$DEST"
.venv/bin/kaggle competitions download -c "$COMPETITION" -p "$DEST"
echo "unpacking into $DEST (about 20 GB)"
.venv/bin/python -m zipfile -e "$DEST/$COMPETITION.zip" "$DEST"
rm "$DEST/$COMPETITION.zip"
.venv/bin/python -m src.validate --config configs/hpa_nasnet512.yaml data.dir="$DEST"
