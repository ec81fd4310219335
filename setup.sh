#!/usr/bin/env bash
# Create (or reuse) ./.venv and install the pinned requirements into it.
#   bash setup.sh          runtime requirements (requirements.txt)
#   bash setup.sh --test   runtime + test requirements (requirements-test.txt)
# Re-running is cheap: pip runs only when the requirement files changed since the last install.
set -euo pipefail

usage() { echo "usage: bash setup.sh [--test]" >&2; exit 2; }
cd "$(dirname "$0")"

REQUIREMENTS=requirements.txt
case "${1:-}" in
  "") ;;
  --test) REQUIREMENTS=requirements-test.txt ;;
  *) usage ;;
esac
PYTHON=${PYTHON:-python3}
VENV_DIR=${VENV_DIR:-.venv}

if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$VENV_DIR"
  "$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV_DIR/.installed-$(cat requirements.txt "$REQUIREMENTS" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup.sh: installing $REQUIREMENTS into $VENV_DIR (first time: a few minutes)"
  "$VENV_DIR/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
  touch "$stamp"
fi
