#!/usr/bin/env bash
# The IsoFLOP study end to end on a CPU: grid -> sweep -> fit, 3 budgets x 3 model sizes of the
# `micro` grid (soda_mega/scaling/grids/micro.yaml) on the demo corpus. About 20 minutes on 2
# cores; everything goes to $OUT, and a rerun resumes (finished runs are skipped).
#
#   bash launchers/scaling_micro_sweep.sh
#   OUT=runs/my-sweep DATA=runs/demo-corpus PUBLISH=1 bash launchers/scaling_micro_sweep.sh
#
# Environment: OUT (default runs/scaling-micro), DATA (default runs/demo-corpus, a plain path:
# letters, digits and ._/+@=~-; built with `soda-mega data demo $DATA` when missing), PYTHON (default .venv/bin/python when present),
# PUBLISH=1 to copy the plot, the results CSV and the stamped fit report to
# benchmarks/results/scaling_micro_sweep.{png,csv,json}. Extra arguments go to `scaling sweep`
# (e.g. --launcher torchrun --nproc 2, or --data.num_workers=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-runs/scaling-micro}
DATA=${DATA:-runs/demo-corpus}
# DATA goes into the YAML list --data.train=[DATA/speech, DATA/text], where a comma, bracket,
# quote, '#' or ': ' would add, cut or reshape entries: a plain path only.
if ! [[ $DATA =~ ^[A-Za-z0-9._/+@=~-]+$ ]]; then
  printf 'soda-mega: DATA must be a plain path (letters, digits and ._/+@=~- only), got %q\n' "$DATA" >&2
  exit 2
fi
SODA=("$PYTHON" -m soda_mega.cli)
start=$SECONDS

if [ ! -f "$DATA/speech/train/soda_meta.json" ] || [ ! -f "$DATA/text/train/soda_meta.json" ]; then
  echo "== building the demo corpus in $DATA"
  "${SODA[@]}" data demo "$DATA"
fi

echo "== grid: $OUT"
"${SODA[@]}" scaling grid --grid micro --out "$OUT" "--data.train=[$DATA/speech, $DATA/text]"

echo "== sweep"
if ! "${SODA[@]}" scaling sweep "$OUT/manifest.json" "$@"; then
  echo "soda-mega: some runs failed (their logs are listed above); rerun this script to retry them" >&2
  exit 1
fi

echo "== fit"
"${SODA[@]}" scaling fit "$OUT/results.csv" --out "$OUT/fit" --predict 6e13 \
  --title "micro IsoFLOP sweep on the demo corpus (CPU, 3 budgets x 3 sizes): tests the pipeline, not SODA's exponents"

if [ "${PUBLISH:-0}" = 1 ]; then
  mkdir -p benchmarks/results
  cp "$OUT/fit/scaling_fit.png" benchmarks/results/scaling_micro_sweep.png
  cp "$OUT/results.csv" benchmarks/results/scaling_micro_sweep.csv
  cp "$OUT/fit/fit.json" benchmarks/results/scaling_micro_sweep.json
  echo "== published benchmarks/results/scaling_micro_sweep.{png,csv,json}"
fi
echo "== done in $((SECONDS - start)) s"
