#!/usr/bin/env bash
# The whole GPU check in one command (python -m bench.gpu_check; docs/gpu.md, "On a GPU for the first time").
#
#   GPU_CHECK_COMMIT=<sha> bash bench/gpu_check.sh   # on the GPU box, from a copy with .whl/ and .raystub/
#   bash bench/gpu_check.sh --dry                    # anywhere: the same parts on CPU with tiny sizes
#   bash bench/gpu_check.sh --help                   # the options (--results, --parts, --workdir)
#
# Prepare with `bash bench/gpu_prepare.sh` on a machine that reaches the package registry. The box has its own
# torch (2.11, CUDA 13) and transformers 5.x but no registry: the carried wheels in .whl/ are installed once into
# /tmp/site and put first on PYTHONPATH with the ray stub in .raystub/. With $OUT set (the device tool's folder,
# the only one that comes back) the results go there: gpu_check.json, gpu_check.txt, gpu_check-logs.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s)}   # the parts' deadline counts from here (the install included)
export PYTHONUNBUFFERED=1                           # every line reaches the log (and the tool's tail) at once
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1   # no hub: fail at once, never wait on it
export GPU_CHECK_COMMAND="bash bench/gpu_check.sh $*"

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
    # recorded rather than fatal: the smoke part then shows which import fails
    setup="pip install of .whl/ into $SITE FAILED"
  fi
  [[ -d .raystub ]] || setup="$setup; no .raystub/ (verl imports ray at import time)"
  export PYTHONPATH="$SITE:$PWD/.raystub${PYTHONPATH:+:$PYTHONPATH}"
fi
export GPU_CHECK_SETUP="$setup"
echo "gpu_check.sh: $setup" >&2

args=("$@")
if [[ -n "${OUT:-}" ]]; then args+=(--results "$OUT"); fi
exec "$PYTHON" -m bench.gpu_check "${args[@]}"
