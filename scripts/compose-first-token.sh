#!/usr/bin/env bash
# Cold start to first token: seconds from `docker compose up` to the first streamed token of a
# completion through the gateway (containers created from scratch, Redis volume empty), then
# tears the project down. Prints one line: "<engine> workers=<n> up_to_first_token_s=<s>".
#
#   SLIPSTREAM_IMAGE=slipstream:sim bash scripts/compose-first-token.sh            # sim engine
#   SLIPSTREAM_IMAGE=slipstream:llama SLIPSTREAM_WORKER_ENGINE=llama \
#     bash scripts/compose-first-token.sh 1                                       # Gemma 270M
#
# Argument: worker replicas (default 3). Uses docker-compose.yml + deploy/docker/compose.ci.yml
# (local images, gateway on 127.0.0.1:$SLIPSTREAM_GATEWAY_PORT, default 18000).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-3}
export SLIPSTREAM_GATEWAY_PORT=${SLIPSTREAM_GATEWAY_PORT:-18000}
project=slipfirst$$
compose=(docker compose -p "$project" -f docker-compose.yml -f deploy/docker/compose.ci.yml)
trap '"${compose[@]}" down -v --timeout 5 >/dev/null 2>&1' EXIT

start=$(date +%s.%N)
"${compose[@]}" up -d --no-build --scale "worker=$workers" redis gateway worker >/dev/null 2>&1
key=""
for _ in $(seq 1 120); do
  key=$("${compose[@]}" exec -T gateway slipstream keys create --tenant first 2>/dev/null) && break
  sleep 0.5
done
body='{"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 4,
       "stream": true, "temperature": 0}'
for _ in $(seq 1 600); do
  if { curl -sN --max-time 120 "http://127.0.0.1:$SLIPSTREAM_GATEWAY_PORT/v1/completions" \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d "$body" || true; } |
    grep -m1 -q '"text"'; then
    end=$(date +%s.%N)
    echo "${SLIPSTREAM_WORKER_ENGINE:-sim} workers=$workers up_to_first_token_s=$(awk "BEGIN {printf \"%.1f\", $end - $start}")"
    exit 0
  fi
  sleep 0.2
done
echo "no token within the time allowed" >&2
exit 1
