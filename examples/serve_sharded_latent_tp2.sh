#!/usr/bin/env bash
# Serve a DeepSeek-V2-style model with the sharded-latent backend at TP=2, send one request, stop.
#
# What it shows: `vllm serve --attention-backend mla_plugin_gla --tensor-parallel-size 2`
# with the options in --hf-overrides (here softmax "exact", which equals MLA): each of the
# two ranks caches d_c/2 + d_R latent values per token instead of d_c + d_R. One greedy
# completion through the OpenAI-compatible API with curl, proof that the plugin's decode
# ran in both TP ranks (MLA_PLUGIN_TRACE_FILE: one line per process), then the server is
# stopped by its PID.
#
# Run it with the environment's vllm and python first on PATH (about 1-2 minutes on 2 CPU cores):
#
#     PATH=$PWD/.venv/bin:$PATH bash examples/serve_sharded_latent_tp2.sh [--model DIR] [--port 8000]
#         [--max-tokens 16] [--prompt TEXT]
#
# Default model: the bundled tiny DeepSeek-V2. DEVICE=auto (the default) is cuda where torch sees a
# GPU, else cpu. On cpu: VLLM_CPU_OMP_THREADS_BIND='0|1' (the CPU cores of rank 0 | rank 1; e.g.
# '0-7|8-15' on 16 cores), VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache) and extra serve flags
# "--dtype float32 --enforce-eager --max-model-len 512"; on cuda no extra flags (2 GPUs, vLLM's
# defaults). SERVE_EXTRA_ARGS replaces the extra flags whenever it is set, an empty value meaning none:
#
#     SERVE_EXTRA_ARGS="" bash examples/serve_sharded_latent_tp2.sh --model /models/deepseek-v2-lite
#
# Exit status 0 when the completion came from the plugin's decode in both ranks.
set -euo pipefail

MODEL=""
PORT=8000
MAX_TOKENS=16
PROMPT="The album was released in"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --prompt) PROMPT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (options: --model DIR --port N --max-tokens N --prompt TEXT)" >&2; exit 2 ;;
  esac
done
for tool in vllm python3 curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; put the environment's bin first on PATH (PATH=\$PWD/.venv/bin:\$PATH)" >&2; exit 2; }
done
if [ -z "$MODEL" ]; then
  MODEL=$(python3 -c 'from mla_plugin.fixtures import trained_fixture; print(trained_fixture("deepseek-v2-tiny"))')
fi

DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  DEVICE=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
fi
case "$DEVICE" in
  cpu)
    export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-'0|1'}
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
    DEFAULT_EXTRA_ARGS="--dtype float32 --enforce-eager --max-model-len 512" ;;
  cuda) DEFAULT_EXTRA_ARGS="" ;;
  *) echo "error: DEVICE must be auto, cpu or cuda, got '$DEVICE'" >&2; exit 2 ;;
esac
# ${VAR-default}: a SERVE_EXTRA_ARGS that is set, even to "", replaces the defaults
SERVE_EXTRA_ARGS=${SERVE_EXTRA_ARGS-$DEFAULT_EXTRA_ARGS}

WORK=$(mktemp -d -t mla_plugin_serve_XXXXXX)
LOG=$WORK/server.log
export MLA_PLUGIN_TRACE_FILE=$WORK/decode-trace.txt  # each process running our decode adds a line

echo "[1/3] ($DEVICE) vllm serve $MODEL --host 127.0.0.1 --port $PORT --served-model-name sharded-latent \\"
echo "          --attention-backend mla_plugin_gla --tensor-parallel-size 2 \\"
echo "          --hf-overrides '{\"mla_plugin\": {\"softmax\": \"exact\"}}' $SERVE_EXTRA_ARGS"
echo "      (log: $LOG, removed at the end; its tail is printed if something fails)"
# setsid: the server and its engine and worker processes get their own process group.
# shellcheck disable=SC2086  # SERVE_EXTRA_ARGS is a list of words
setsid vllm serve "$MODEL" --host 127.0.0.1 --port "$PORT" --served-model-name sharded-latent \
  --attention-backend mla_plugin_gla --tensor-parallel-size 2 \
  --hf-overrides '{"mla_plugin": {"softmax": "exact"}}' $SERVE_EXTRA_ARGS >"$LOG" 2>&1 &
SERVER_PID=$!

stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  kill -KILL -- "-$SERVER_PID" 2>/dev/null || true  # engine core or TP workers, if any survived
  echo "[3/3] server (pid $SERVER_PID) stopped"
  rm -rf "$WORK"
}
trap stop_server EXIT

echo "      waiting for http://127.0.0.1:$PORT/health (pid $SERVER_PID) ..."
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "error: vllm serve exited before it was ready; the end of its log:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  sleep 1
done

REQUEST=$(python3 -c 'import json, sys; print(json.dumps({"model": "sharded-latent", "prompt": sys.argv[1],
                                                          "max_tokens": int(sys.argv[2]), "temperature": 0}))' \
  "$PROMPT" "$MAX_TOKENS")
echo "[2/3] curl http://127.0.0.1:$PORT/v1/completions -d '$REQUEST'"
REPLY=$(curl -sS --fail-with-body "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" \
  -d "$REQUEST") || { echo "error: the completion request failed: $REPLY" >&2; tail -n 40 "$LOG" >&2; exit 1; }
echo "      prompt:     $PROMPT"
echo "      completion: $(python3 -c 'import json, sys; print(repr(json.loads(sys.argv[1])["choices"][0]["text"]))' "$REPLY")"

# Proof that the plugin's sharded-latent decode (not vLLM's MLA) ran in both TP ranks.
RANKS=$(grep -c '^MLA_PLUGIN_GLA ' "$MLA_PLUGIN_TRACE_FILE" 2>/dev/null || true)
sed 's/^/      decode ran: /' "$MLA_PLUGIN_TRACE_FILE" 2>/dev/null || true
if [ "${RANKS:-0}" -ne 2 ]; then
  echo "error: expected the MLA_PLUGIN_GLA decode in 2 processes (one per TP rank), found ${RANKS:-0}" >&2
  exit 1
fi
echo "      MLA_PLUGIN_GLA decode ran in both TP ranks"
