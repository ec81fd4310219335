#!/usr/bin/env bash
# Set up ./.venv with the pinned runtime + test requirements, then run the whole CPU test suite.
# Usage: bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh --test
exec .venv/bin/python -m pytest tests "$@"
