#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU.
#
#   CONFIG=launchers/configs/soda-135m.yaml bash launchers/torchrun.sh [--section.key=value ...]
#   NGPUS=4 CONFIG=... bash launchers/torchrun.sh --dry-run     # print layout + memory, exit
#
# Environment: CONFIG (required), NGPUS (default: every GPU nvidia-smi lists, else 1),
# MASTER_PORT (default 29500), PYTHON (default: .venv/bin/python when present, else python3).
# The run resumes from the newest checkpoint in run.dir, so re-running the same command after
# a crash continues it.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONFIG:?set CONFIG=path/to/config.yaml (see launchers/configs/)}"
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPUS:-0}" -gt 0 ] || NGPUS=1
fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then
    exec "$PYTHON" -m soda_mega.cli train --config "$CONFIG" --world-size "$NGPUS" "$@"
  fi
done
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPUS" \
  --master-port "${MASTER_PORT:-29500}" -m soda_mega.cli train --config "$CONFIG" "$@"
