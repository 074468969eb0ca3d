#!/usr/bin/env bash
# One command from a fresh clone: create .venv, install soda-mega and its dependencies
# (without ever replacing the torch that is there), then run what was asked:
#   bash scripts/bootstrap.sh test        # the static checks + the test suite (what CI runs)
#   bash scripts/bootstrap.sh demo        # the main job: tiny model on the demo corpus, CPU
#   bash scripts/bootstrap.sh install     # only the environment
#   bash scripts/bootstrap.sh -- CMD ...  # any command inside the environment
# Environment: PYTHON (interpreter for the venv, default python3), SODA_VENV (default .venv),
# SODA_TORCH (torch requirement used only when the venv has no torch, default torch==2.13.0,
# which on the project's CPU machines is a local CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${SODA_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp="$VENV/.soda-mega-installed"
want=$(cat setup.py requirements/*.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! python -c "import torch" 2>/dev/null; then
    echo "[bootstrap] installing ${SODA_TORCH:-torch==2.13.0}"
    python -m pip install -q "${SODA_TORCH:-torch==2.13.0}"
  fi
  # Pin the torch that is now present so that no later step can swap it for another build.
  python -c "import torch; print('torch==' + torch.__version__)" > "$VENV/torch-constraint.txt"
  echo "[bootstrap] torch: $(cat "$VENV/torch-constraint.txt"); installing dependencies"
  python -m pip install -q -c "$VENV/torch-constraint.txt" \
    -r requirements/runtime.txt -r requirements/test.txt -r requirements/lint.txt
  python -m pip install -q --no-deps -r requirements/nodeps.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
  echo "[bootstrap] environment ready"
fi

# espeak-ng synthesises the speech of the demo corpus (`soda-mega data demo`). Best effort:
# installed only when missing, with apt-get, as root; never fails the bootstrap. Without it the
# demo falls back to the few WAV files shipped in soda_mega/data/write/demo_assets/fallback.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] installing espeak-ng (speech for the demo corpus)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1; }; } || true
  fi
  if ! command -v espeak-ng >/dev/null 2>&1; then
    echo "[bootstrap] NOTE: espeak-ng is not installed and could not be installed here (needs apt-get" \
         "and root); \`soda-mega data demo\` will use the shipped WAV files instead"
  fi
fi

cmd=${1:-test}
[ $# -gt 0 ] && shift
case "$cmd" in
  install) ;;
  # -n 3: three pytest-xdist workers, each taking whole test modules, the longest first
  # (tests/conftest.py). Three on the 2 cores of CI because much of the suite waits (Slurm's
  # time limits, watchdog timeouts, stop signals, process start-ups): on a 2-core machine one
  # worker took 20-23 min of an older, smaller suite, two 12-12.3 min, three 10.8 min. The
  # suite of issues 31-33 took 21.2 min on three workers and 20.9 min on four (more workers
  # only slow each test down). SODA_TEST_WORKERS changes the count; `-n 0` among the arguments
  # runs everything in this one process (for -s or --pdb).
  # The static checks first (scripts/lint.sh: ruff, then mypy; seconds): a finding fails the
  # run before the suite starts.
  test) bash scripts/lint.sh
        exec python -m pytest tests -n "${SODA_TEST_WORKERS:-3}" --durations=25 "$@" ;;
  demo)
    # The main job on the embedded default: the tiny model on the demo corpus, on CPU.
    if [ ! -f runs/demo-corpus/speech/train/soda_meta.json ] || [ ! -f runs/demo-corpus/text/train/soda_meta.json ]; then
      soda-mega data demo runs/demo-corpus
    fi
    exec soda-mega train --config launchers/configs/tiny-demo.yaml "$@" ;;
  --) exec "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh [test|demo|install|-- CMD...]" >&2; exit 2 ;;
esac
