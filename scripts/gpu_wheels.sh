#!/usr/bin/env bash
# Fetch, on this machine (network, any CPU), the wheels the GPU host lacks, for its Python 3.12
# on x86-64 Linux, into an ignored folder that the device tool carries along:
#
#   .gpu-wheels/pinned/   exactly the pins of benchmarks/gpu_wheels.txt (what CI tests)
#   .gpu-wheels/newest/   the newest megatron-core (the campaign's information-only probe)
#   .gpu-wheels/COMMIT    the commit of this tree (the copy sent to the GPU host has no .git)
#
#   bash scripts/gpu_wheels.sh           # fetch (pip's cache makes a rerun fast), check, stamp
#   bash scripts/gpu_wheels.sh --stamp   # only rewrite .gpu-wheels/COMMIT
#
# Then run the campaign with the device tool as benchmarks/README.md shows. Fails when a pin
# has no cp312 / pure-Python wheel, when a folder holds two versions of one package, or when the
# working tree plus the wheels exceed what one device call carries (64 MiB).
# Environment: PYTHON (default python3), GPU_WHEELS_DIR (default .gpu-wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GPU_WHEELS_DIR:-.gpu-wheels}
LIST=benchmarks/gpu_wheels.txt
LIMIT=$((64 * 1024 * 1024))

stamp() {
  mkdir -p "$DEST"
  local commit
  commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"
  fi
  echo "$commit (stamped by scripts/gpu_wheels.sh at $(date -u +%FT%TZ))" > "$DEST/COMMIT"
  echo "[gpu-wheels] $DEST/COMMIT: $(cat "$DEST/COMMIT")"
}
if [ "${1:-}" = "--stamp" ]; then stamp; exit 0; fi
if [ $# -gt 0 ]; then echo "usage: bash scripts/gpu_wheels.sh [--stamp]" >&2; exit 2; fi

# pip matches manylinux tags exactly: name every glibc level up to the host's (Ubuntu 24.04).
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312
          --abi abi3 --abi none)
for tag in manylinux_2_{39,35,34,31,28,27,24,17}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORM+=(--platform "$tag")
done

mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
for pin in "${PINS[@]}"; do
  [[ "$pin" == *==* ]] || { echo "[gpu-wheels] $LIST: '$pin' is not name==version" >&2; exit 2; }
done

fetch() {  # fetch FOLDER REQUIREMENT... : download into a fresh folder, then swap it in
  local out=$1; shift
  rm -rf "$out.new"
  mkdir -p "$out.new"
  "$PY" -m pip download -q "${PLATFORM[@]}" -d "$out.new" "$@"
  rm -rf "$out"
  mv "$out.new" "$out"
}
echo "[gpu-wheels] downloading ${#PINS[@]} pinned wheels into $DEST/pinned"
fetch "$DEST/pinned" "${PINS[@]}"
echo "[gpu-wheels] downloading the newest megatron-core into $DEST/newest"
fetch "$DEST/newest" megatron-core

# One wheel per pin, nothing else, no package twice.
"$PY" - "$DEST" "${PINS[@]}" <<'PY'
import re, sys
from pathlib import Path

dest, pins = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
wheels = {}
for w in sorted((dest / "pinned").glob("*.whl")):
    name, version = w.name.split("-")[:2]
    if norm(name) in wheels:
        sys.exit(f"[gpu-wheels] two wheels of {name} in {dest}/pinned: pip would refuse them")
    wheels[norm(name)] = version
want = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
if wheels != want:
    sys.exit(f"[gpu-wheels] {dest}/pinned holds {wheels}, the list asks for {want}")
newest = sorted((dest / "newest").glob("megatron_core-*.whl"))
if len(newest) != 1:
    sys.exit(f"[gpu-wheels] expected one megatron-core wheel in {dest}/newest, found {newest}")
print(f"[gpu-wheels] pinned: {', '.join(f'{k}=={v}' for k, v in wheels.items())}")
print(f"[gpu-wheels] newest: {newest[0].name}")
PY

# What one device call carries: tracked + untracked-not-ignored files, plus the carried wheels.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
wheels=$(find "$DEST" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
total=$((tree + wheels))
awk -v t="$tree" -v w="$wheels" 'BEGIN {printf "[gpu-wheels] working tree %.1f MiB + wheels %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / 1048576, w / 1048576, (t + w) / 1048576}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "[gpu-wheels] too large for one device call" >&2
  exit 1
fi
stamp
