#!/usr/bin/env bash
# Real clients nobody here wrote, against a local Slipstream: GuideLLM (vLLM's benchmark tool,
# default chat requests, synchronous and constant-rate profiles) and the LiteLLM SDK (streaming,
# not streaming, and an unsupported parameter that must come back as a clear 400).
#
#   bash bench/real_clients.sh            # sim engine; prints a summary, writes $WORK/*.json
#   ENGINE=llama bash bench/real_clients.sh   # the real Gemma 3 270M worker (slower)
#
# Neither tool is a project dependency: they live in a scratch virtualenv OUTSIDE the repo
# ($CLIENT_VENV, default /tmp/guidellm-venv; created on first use: guidellm pulls torch and
# transformers, ~2 min and ~2 GB with the CPU torch wheel). There is no model hub here, so
# GuideLLM gets a local prompts file and a tokenizer built offline (bench/real_clients.py).
# The whole run holds /tmp/slipstream-bench.lock, like every benchmark on a shared machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${REAL_CLIENTS_LOCKED:-}" ]]; then
    REAL_CLIENTS_LOCKED=1 exec flock /tmp/slipstream-bench.lock "$0" "$@"
fi

PY="${SLIPSTREAM_PYTHON:-$ROOT/.venv/bin/python}"
CLIENT_VENV="${CLIENT_VENV:-/tmp/guidellm-venv}"
GUIDELLM_VERSION="${GUIDELLM_VERSION:-0.8.1}"
LITELLM_VERSION="${LITELLM_VERSION:-1.110.2}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ENGINE="${ENGINE:-sim}"
PORT="${PORT:-8731}"
REDIS_PORT="${REDIS_PORT:-6391}"
REQUESTS="${REQUESTS:-20}"
RATE="${RATE:-2}"          # constant profile: requests per second
MAX_TOKENS="${MAX_TOKENS:-32}"
WORK="${WORK:-$(mktemp -d /tmp/real-clients.XXXXXX)}"
mkdir -p "$WORK"

if [[ ! -x "$CLIENT_VENV/bin/guidellm" || ! -x "$CLIENT_VENV/bin/python" ]] \
    || ! "$CLIENT_VENV/bin/python" -c "import litellm" 2>/dev/null; then
    echo "== creating $CLIENT_VENV (guidellm $GUIDELLM_VERSION, litellm $LITELLM_VERSION)"
    python3 -m venv "$CLIENT_VENV"
    # torch first, pinned: unpinned, guidellm would pull the newest (CUDA) build
    "$CLIENT_VENV/bin/pip" install -q "torch==$TORCH_VERSION"
    "$CLIENT_VENV/bin/pip" install -q "guidellm==$GUIDELLM_VERSION" "litellm==$LITELLM_VERSION"
fi
CPY="$CLIENT_VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True

UP_PID=""
teardown() {
    if [[ -n "$UP_PID" ]] && kill -0 "$UP_PID" 2>/dev/null; then
        kill -INT "$UP_PID" 2>/dev/null || true   # slipstream up drains workers, stops Redis
        for _ in $(seq 1 60); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$UP_PID" 2>/dev/null || true
    fi
}
trap teardown EXIT

echo "== slipstream up --engine $ENGINE on :$PORT (Redis :$REDIS_PORT), work dir $WORK"
(cd "$WORK" && REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" \
    exec "$PY" -m slipstream up --engine "$ENGINE" --port "$PORT") >"$WORK/up.log" 2>&1 &
UP_PID=$!
MODEL=""
for _ in $(seq 1 600); do   # the llama engine assembles and loads the model on first use
    MODEL="$("$CPY" "$ROOT/bench/real_clients.py" model "http://127.0.0.1:$PORT" 2>/dev/null || true)"
    [[ -n "$MODEL" ]] && break
    kill -0 "$UP_PID" 2>/dev/null || { tail -20 "$WORK/up.log"; exit 1; }
    sleep 0.5
done
[[ -n "$MODEL" ]] || { echo "no model served after 300 s"; tail -20 "$WORK/up.log"; exit 1; }
echo "== model $MODEL"

"$CPY" "$ROOT/bench/real_clients.py" prepare "$WORK"
TARGET="http://127.0.0.1:$PORT"
BACKEND="kind=openai_http,target=$TARGET,model=$MODEL,max_tokens=$MAX_TOKENS"
guidellm_run() {  # name, profile, data...
    local name="$1" profile="$2"; shift 2
    echo "== guidellm run: $name ($profile)"
    timeout 600 "$CLIENT_VENV/bin/guidellm" run --backend "$BACKEND" --profile "$profile" \
        --constraint "kind=max_requests,count=$REQUESTS" "$@" \
        --output "kind=json,path=$WORK/guidellm_$name.json" \
        --disable-progress >"$WORK/guidellm_$name.log" 2>&1 \
        || { echo "guidellm $name failed:"; tail -20 "$WORK/guidellm_$name.log"; }
}
FILE_DATA=(--data "kind=json_file,path=$WORK/prompts.jsonl")
guidellm_run sync kind=synchronous "${FILE_DATA[@]}"
guidellm_run constant "kind=constant,rate=$RATE" "${FILE_DATA[@]}"
# GuideLLM's quickstart form: synthetic prompts of N tokens with a fixed output length
# (this sends ignore_eos and stop: null besides continuous_usage_stats)
guidellm_run synthetic kind=synchronous \
    --data "kind=synthetic_text,prompt_tokens=64,output_tokens=$MAX_TOKENS" \
    --tokenizer "kind=hf_auto,model=$WORK/tokenizer"

echo "== litellm"
"$CPY" "$ROOT/bench/real_clients.py" litellm "$TARGET/v1" "$MODEL" "$ENGINE" \
    | tee "$WORK/litellm.txt"

echo "== summary (guidellm $("$CLIENT_VENV/bin/guidellm" --version 2>&1 | tail -1)," \
    "litellm $("$CPY" -c 'import importlib.metadata as m; print(m.version("litellm"))'))"
"$CPY" "$ROOT/bench/real_clients.py" summary "$WORK"
