#!/usr/bin/env bash
# Where the package index is reachable: download the exact wheels bench/gpu/wheels.txt names, for the GPU
# machine's Python (cp312, manylinux x86_64), into bench/gpu/wheels/ (git-ignored).  Copy the checkout
# with that folder to the GPU machine, then run bench/gpu/run.sh there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WHEELS="${BENCH_GPU_WHEELS:-$HERE/wheels}"
PY_VERSION="${BENCH_GPU_PYTHON_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
LIMIT_MB=50

mapfile -t requirements < <(awk '!/^#/ && NF {print $1}' "$HERE/wheels.txt")
mkdir -p "$WHEELS"
# shellcheck disable=SC2086  # PIP may be a command with arguments
$PIP download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
  --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "${requirements[@]}"
size=$(du -sm "$WHEELS" | cut -f1)
ls -1 "$WHEELS"
echo "$(ls -1 "$WHEELS" | wc -l) wheels, ${size} MB in $WHEELS"
if (( size > LIMIT_MB )); then
  echo "more than ${LIMIT_MB} MB of wheels: trim bench/gpu/wheels.txt" >&2
  exit 1
fi
