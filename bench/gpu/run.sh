#!/usr/bin/env bash
# On a bare GPU machine (Python with torch and transformers, no network): install the wheels that
# prepare.sh downloaded, offline, into a folder of their own (only those whose module is missing), then
# run `python -m bench gpu` with that folder on PYTHONPATH.  Arguments go to the bench.
#   bench/gpu/run.sh                 # the full run, JSON to $OUT/bench-gpu.json or .cache/bench/gpu.json
#   bench/gpu/run.sh --smoke         # the same code at toy sizes
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${BENCH_GPU_WHEELS:-$HERE/wheels}"
TARGET="${BENCH_GPU_TARGET:-${TMPDIR:-/tmp}/commoncanvas-bench-gpu-site}"
if [[ -n "${OUT:-}" ]]; then RESULT="$OUT/bench-gpu.json"; else RESULT="$REPO/.cache/bench/gpu.json"; fi

missing=()
while read -r requirement module; do
  [[ -z "$requirement" || "$requirement" == \#* ]] && continue
  PYTHONPATH="$TARGET" "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$requirement")
done < "$HERE/wheels.txt"

if (( ${#missing[@]} )); then
  [[ -d "$WHEELS" ]] || { echo "no $WHEELS: run bench/gpu/prepare.sh where the package index is" >&2; exit 1; }
  mkdir -p "$TARGET"
  echo "installing offline into $TARGET: ${missing[*]}"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --target "$TARGET" \
      --disable-pip-version-check "${missing[@]}"
  else
    # No pip: a wheel is a zip whose contents are laid out as site-packages wants them.
    "$PYTHON" - "$WHEELS" "$TARGET" "${missing[@]}" <<'PY'
import glob, os, re, sys, zipfile
wheels, target, *requirements = sys.argv[1:]
for requirement in requirements:
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [p for p in glob.glob(os.path.join(wheels, "*.whl"))
             if os.path.basename(p).lower().startswith(f"{stem}-{version}-")]
    if not found:
        sys.exit(f"no wheel for {requirement} in {wheels}")
    zipfile.ZipFile(found[0]).extractall(target)
PY
  fi
fi
cd "$REPO"
PYTHONPATH="$TARGET:$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m bench gpu --out "$RESULT" "$@"
