#!/usr/bin/env bash
# The project's test command (README and CI): install, then run the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -p no:cacheprovider "$@"
