# Sourced by start_linux.sh and run_tests.sh: creates .venv and installs the requirements when they changed.
# Every step fails loudly (set -e in the caller); nothing is skipped silently.

setup_env() {
  local kind="$1"  # runtime | test
  local python="${PYTHON:-python3}"
  "$python" - <<'PY' || { echo "Python 3.11 or newer is needed (set PYTHON=...)" >&2; return 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
  if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $python"
    "$python" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  local files=(requirements.txt)
  [ "$kind" = test ] && files+=(requirements-test.txt)
  local stamp=".venv/.installed-$kind"
  local digest
  digest=$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "installing ${files[*]} (llama-cpp-python compiles from source the first time: about 10 minutes)"
    python -m pip install --upgrade pip >/dev/null
    local args=()
    for f in "${files[@]}"; do args+=(-r "$f"); done
    python -m pip install "${args[@]}"
    echo "$digest" > "$stamp"
  fi
  # `modules` first: it quiets torchao's and torch's import-time warnings (modules/__init__.py)
  python -c "import modules, torch, transformers, llama_cpp, gradio, peft" \
    || { echo "the Python environment is incomplete; delete .venv and run again" >&2; return 1; }
  # llama.cpp's GGUF converters (LoRA/merged-model export), from the pinned llama-cpp-python sdist, once
  bash scripts/fetch_llama_converters.sh
  if [ "$kind" = test ]; then
    if ! command -v chromium >/dev/null 2>&1; then
      echo "installing Debian's chromium for the browser tests"
      if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
      else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
      fi
    fi
    command -v chromium >/dev/null || { echo "chromium is missing; the browser tests need it" >&2; return 1; }
  fi
}
