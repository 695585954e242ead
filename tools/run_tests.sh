#!/usr/bin/env bash
# The README's test command: set up (if needed), check the code style, and
# run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
VENV=${MMTUNE_VENV:-.venv}
echo "[tests] code style (ruff)"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[tests] pytest"
exec "$VENV/bin/python" -m pytest tests "$@"
