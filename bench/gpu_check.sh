#!/usr/bin/env bash
# The whole GPU check in one command (bench/gpu_check.py: segment layouts, throughput and MFU, peak memory against
# btrm.plan, the real trainer under FSDP2 / FSDP1 / CPU offload), writing one JSON. Under 8 minutes on 1x H200.
#
#   bash bench/gpu_check.sh              # on the lent GPU box, from a copy of the repository with .whl/ and .raystub/
#   bash bench/gpu_check.sh --dry        # anywhere: the same script on CPU with tiny sizes (well under a minute)
#   bash bench/gpu_check.sh --help       # gpu_check.py's options (--out, --parts, --workdir ...)
#
# Setup (not with --dry): the box has its own torch (2.11, CUDA 13) and transformers 5.x but no registry, so the
# carried wheels in .whl/ (../shared/gpu/fetch_wheels.sh: verl 0.6.1, transformers 4.57.6, ...) are installed once
# into /tmp/site and put first on PYTHONPATH with the ray stub in .raystub/ (../shared/gpu/README.md).
# When $OUT is set (the device tool's folder, the only one that comes back), the JSON and the logs are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-auto}   # interpreter; auto: the project's .venv/bin/python when it exists, else python3
SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the carried wheels are installed
if [[ "$PYTHON" == auto ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

dry=false
for arg in "$@"; do [[ "$arg" == --dry ]] && dry=true; done

setup="no .whl/ here: the interpreter's own packages"
if [[ "$dry" == true ]]; then
  setup="--dry: the interpreter's own packages"
elif compgen -G '.whl/*.whl' >/dev/null; then
  start=$SECONDS
  # once per box: a second run (a warm machine) finds the marker and keeps the installed copy
  if [[ -f "$SITE/.gpu_check_installed" ]]; then
    setup="wheels already in $SITE"
  elif "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
    touch "$SITE/.gpu_check_installed"
    setup="installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE in $((SECONDS - start)) s"
  else
    # recorded rather than fatal: the parts then fail one by one with their import errors in the JSON
    setup="pip install of .whl/ into $SITE FAILED"
  fi
  [[ -d .raystub ]] || setup="$setup; no .raystub/ (verl imports ray at import time)"
  export PYTHONPATH="$SITE:$PWD/.raystub${PYTHONPATH:+:$PYTHONPATH}"
fi
export GPU_CHECK_SETUP="$setup"
echo "gpu_check.sh: $setup" >&2

args=("$@")
if [[ -n "${OUT:-}" ]]; then args+=(--copy-to "$OUT"); fi
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
