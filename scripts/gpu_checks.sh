#!/usr/bin/env bash
# The GPU checks of the ops in one go, on a machine with CUDA: every `-m gpu` test under
# tests/unit (Triton kernels compiled for the GPU against the float64 references, the fp8
# cache, the whole decode step captured in one CUDA graph and replayed bit for bit).
# Then the static report and the decode benchmark beside vLLM's Triton MLA kernel (SWEEP=1: also
# the launch-configuration sweep), all written into $OUT.
# Usage: bash scripts/gpu_checks.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Compiled kernels, not Triton's CPU interpreter; the default kernel choice (Triton on CUDA).
unset TRITON_INTERPRET MLA_PLUGIN_KERNEL
"$PYTHON" - <<'PY' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_checks: no CUDA device visible to torch; these checks need a GPU")
print("gpu_checks:", torch.cuda.get_device_name(0), "compute capability %d.%d" % torch.cuda.get_device_capability(0),
      "torch", torch.__version__)
PY
# Outputs go to $OUT (the device tool's folder) or ./gpu_out. Every step runs even if an
# earlier one failed; the exit status is the first failure's.
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
status=0
step() {  # step NAME CMD...: run, tee the log into $OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$OUT/$name.log"; then status=1; echo "== $name FAILED"; fi
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/nvidia_smi_before.csv" 2>&1 || true
# 1. Every -m gpu test of tests/unit: the kernels against float64 references (every tile
#    configuration gpu_launch_config picks), fp8, the decode step captured in one CUDA graph.
step pytest_gpu "$PYTHON" -m pytest -m gpu tests/unit -q -rs -p no:cacheprovider "$@"
# 2. The static report on this machine's compiler (the numbers docs/kernels.md has from a CPU).
step static_report "$PYTHON" benchmarks/static_report.py --json "$OUT/static_report.json"
# 3. The benchmark beside vLLM's Triton MLA kernel (benchmarks/_peer/ must have been copied
#    where vLLM is installed: python benchmarks/vllm_peer.py), then the tuning sweep.
step gpu_decode "$PYTHON" benchmarks/gpu_decode.py --json "$OUT/gpu_decode.json" ${GPU_DECODE_ARGS:-}
if [ -n "${SWEEP:-}" ]; then
    step sweep "$PYTHON" benchmarks/gpu_decode.py --sweep --contexts 32768 --cache-dtype bf16 ${SWEEP_ARGS:-}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/nvidia_smi_after.csv" 2>&1 || true
exit $status
