#!/usr/bin/env bash
# Set up (same as the demo) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The oldest timm that setup.cfg accepts, beside the pinned one, for tests/test_timm_min.py (no dependencies: it
# runs on the venv's torch).
TIMM_MIN=$(sed -n 's/.*timm>=\([0-9.]*\).*/\1/p' setup.cfg)
[ -f ".cache/timm-min/timm-$TIMM_MIN.ok" ] || {
  rm -rf .cache/timm-min
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .cache/timm-min "timm==$TIMM_MIN"
  touch ".cache/timm-min/timm-$TIMM_MIN.ok"
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q tests "$@"
