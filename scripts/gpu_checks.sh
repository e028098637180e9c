#!/usr/bin/env bash
# The GPU checks of the ops in one go, on a machine with CUDA: every `-m gpu` test under
# tests/unit (Triton kernels compiled for the GPU against the float64 references, the fp8
# cache, the whole decode step captured in one CUDA graph and replayed bit for bit).
# Usage: bash scripts/gpu_checks.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Compiled kernels, not Triton's CPU interpreter; the default kernel choice (Triton on CUDA).
unset TRITON_INTERPRET MLA_PLUGIN_KERNEL
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_checks: no CUDA device visible to torch; these checks need a GPU")
print("gpu_checks:", torch.cuda.get_device_name(0), "compute capability %d.%d" % torch.cuda.get_device_capability(0),
      "torch", torch.__version__)
PY
exec "$PYTHON" -m pytest -m gpu tests/unit -q -rs -p no:cacheprovider "$@"
