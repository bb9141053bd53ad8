#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, then the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider --durations=30 "$@"
