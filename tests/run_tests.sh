#!/usr/bin/env bash
# Set up ./.venv with the pinned runtime + test requirements, check formatting and lint (ruff, settings in
# pyproject.toml), then run the whole CPU test suite.
# Usage: bash tests/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh --test
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests "$@"
