#!/usr/bin/env bash
# Before the first command on a GPU box that reaches no package registry, on a machine that does, from the
# repository root:
#
#   bash bench/gpu_prepare.sh [--box-packages FILE]   # default ../shared/gpu/box_packages.txt
#
# 1. downloads the wheels the box lacks (the list: bench/gpu_wheels.py, Python 3.12, Linux x86-64) into .whl/;
# 2. copies the ray stub (bench/ray_stub/, verl imports ray at import time) into .raystub/;
# 3. checks the carried wheels' dependency closure against the box's package list, and the size of the
#    working tree plus .whl/ and .raystub/ against the device tool's 64 MiB carry limit;
# 4. prints the one command to run on the box (docs/gpu.md, "On a GPU for the first time").
# Exit 1 names each missing dependency and the wheel that needs it. .whl/ and .raystub/ are gitignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-auto}   # interpreter with `packaging` and pip; auto: the project's .venv/bin/python, else python3
if [[ "$PYTHON" == auto ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CHECK_ARGS=()
while (( $# )); do
  case "$1" in
    --box-packages) CHECK_ARGS+=(--box-packages "$2"); shift 2 ;;
    --box-packages=*) CHECK_ARGS+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; see bash bench/gpu_prepare.sh --help" >&2; exit 2 ;;
  esac
done

DOWNLOAD=() BUILD=() target=DOWNLOAD
while IFS= read -r line; do
  if [[ "$line" == --build ]]; then target=BUILD; elif [[ "$target" == DOWNLOAD ]]; then DOWNLOAD+=("$line"); else BUILD+=("$line"); fi
done < <("$PYTHON" -m bench.gpu_wheels pins)

rm -rf .whl .raystub
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${DOWNLOAD[@]}"
(( ${#BUILD[@]} == 0 )) || "$PYTHON" -m pip wheel -q --no-deps -w .whl "${BUILD[@]}"   # sdist only, pure Python
cp -r bench/ray_stub .raystub

"$PYTHON" -m bench.gpu_wheels check --wheels .whl "${CHECK_ARGS[@]}"

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | head -c1)
[[ -z "$dirty" ]] || echo "warning: uncommitted changes: the box runs them, but GPU_CHECK_COMMIT names $commit" >&2
cat <<CMD

On the GPU box (device tool run; the whole call within its 600 s limit, a minute spare):
  command:   GPU_CHECK_COMMIT=$commit bash bench/gpu_check.sh
  carry:     [".whl", ".raystub"]
  timeout_s: 540
CMD
