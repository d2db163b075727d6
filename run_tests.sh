#!/usr/bin/env bash
# Install what the tests need (once) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
setup_env test
python download_model.py starter
rc=0
python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
