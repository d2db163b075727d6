#!/usr/bin/env bash
# Install everything (once) and start the web UI on http://127.0.0.1:7860 with the starter model loaded.
# Needs Python 3.11 (set PYTHON=/path/to/python3.11 to choose one). Extra arguments go to webui.py.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
setup_env runtime
python download_model.py starter

# --- extensions: install the requirements.txt of each enabled extension (--extensions, settings.yaml, --api) ----
while IFS= read -r req; do
  stamp=".venv/.installed-ext-$(basename "$(dirname "$req")")"
  digest=$(sha256sum "$req" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "installing $req"
    python -m pip install -r "$req"
    echo "$digest" > "$stamp"
  fi
done < <(python -m modules.extensions requirements "$@")
# -----------------------------------------------------------------------------------------------------------------

exec python webui.py "$@"
