#!/usr/bin/env bash
# The GPU campaign on the GPU host, in one command (benchmarks/README.md, "GPU campaign"):
# install the carried wheels (scripts/gpu_wheels.sh fetched them into .gpu-wheels) into a
# scratch folder, put the working tree on the path, run benchmarks/gpu_campaign.py, and leave
# in OUT at most four files: campaign.tar.gz (everything, repacked after every phase),
# summary.md, campaign.log and wheels.log.
#
#   bash benchmarks/gpu_campaign.sh "$OUT"                 # the whole campaign (<= 9 min)
#   bash benchmarks/gpu_campaign.sh "$OUT" --phases env kernels --total-s 200
#
# Environment: PYTHON (default python3), GPU_WHEELS_DIR (default .gpu-wheels; a folder without
# wheels installs nothing: the interpreter must have the packages then), SODA_SITE (default
# /tmp/soda-site), SODA_CAMPAIGN_DIR (default /tmp/soda-campaign).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_campaign.sh OUT_DIR [gpu_campaign.py options]}
shift
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-.gpu-wheels}
SITE=${SODA_SITE:-/tmp/soda-site}
WORK=${SODA_CAMPAIGN_DIR:-/tmp/soda-campaign}
mkdir -p "$OUT" "$SITE"

{
  shopt -s nullglob
  wheels=("$WHEELS"/pinned/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "[gpu-campaign] installing ${#wheels[@]} wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" || { echo "[gpu-campaign] wheel install failed"; exit 3; }
  else
    echo "[gpu-campaign] no wheels in $WHEELS/pinned: using what $PY has"
  fi
  [ -f "$WHEELS/COMMIT" ] && echo "[gpu-campaign] commit: $(cat "$WHEELS/COMMIT")"
  # the kernels folder is imported as soda_kernels (setup.py's package_dir)
  ln -sfn "$PWD/kernels" "$SITE/soda_kernels"
} > "$OUT/wheels.log" 2>&1 || { cat "$OUT/wheels.log"; exit 3; }
cat "$OUT/wheels.log"

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/wheels.log"
import importlib, importlib.metadata as md
for mod, dist in (("torch", "torch"), ("triton", "triton"), ("megatron.core", "megatron-core"),
                  ("soda_mega", None), ("soda_kernels", None), ("liger_kernel", "liger-kernel"),
                  ("cut_cross_entropy", "cut-cross-entropy")):
    try:
        importlib.import_module(mod)
        print(f"[gpu-campaign] import {mod}: ok {md.version(dist) if dist else ''}")
    except Exception as err:  # noqa: BLE001 - reported; the campaign records what is missing
        print(f"[gpu-campaign] import {mod}: FAILED {type(err).__name__}: {err}")
from soda_mega.data.streaming_compat import streaming_version
print(f"[gpu-campaign] mosaicml-streaming {streaming_version()}")
PY

"$PY" benchmarks/gpu_campaign.py --out "$WORK" --bundle "$OUT/campaign.tar.gz" \
  --newest-wheels "$WHEELS/newest" "$@" 2>&1 | tee "$OUT/campaign.log"
exit "${PIPESTATUS[0]}"
