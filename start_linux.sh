#!/usr/bin/env bash
# Install everything (once) and start the web UI on http://127.0.0.1:7860 with the starter model loaded.
# Needs Python 3.11 (set PYTHON=/path/to/python3.11 to choose one). Extra arguments go to webui.py.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
setup_env runtime
python download_model.py starter
exec python webui.py "$@"
