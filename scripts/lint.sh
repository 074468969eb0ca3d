#!/usr/bin/env bash
# The static checks, as CI runs them (`bash scripts/bootstrap.sh test` runs this before the test
# suite, and a finding fails it): ruff over the whole tree (ruff.toml), then mypy over the
# packages of mypy.ini. A few seconds with warm caches (.ruff_cache, .mypy_cache), under half a
# minute cold. Run inside the environment: `bash scripts/bootstrap.sh -- bash scripts/lint.sh`
# (`... lint.sh ruff` or `... lint.sh mypy`: one of the two, as .pre-commit-config.yaml does).
# After a merge, `python -m ruff check --fix .` redoes the mechanical fixes (import order,
# pyupgrade); what remains needs a hand.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
case "$what" in all|ruff|mypy) ;; *) echo "usage: bash scripts/lint.sh [all|ruff|mypy]" >&2; exit 2 ;; esac

if [ "$what" != mypy ]; then
  python -m ruff check .
fi
[ "$what" = ruff ] && exit 0
# NOTE: the kernels are imported as soda_kernels (setup.py's package_dir maps kernels/ to that
# name); pip's editable install does it with an import hook, which mypy cannot follow. A link
# named soda_kernels in build/mypy_path (mypy.ini's mypy_path) gives mypy the same name.
mkdir -p build/mypy_path
ln -sfn ../../kernels build/mypy_path/soda_kernels
python -m mypy
