#!/usr/bin/env bash
# kvpred's main job: the whole KV-Prediction pipeline on its default models.
#
#   1. kvpred models          trains the default base and auxiliary models on
#                             the Python standard library (once; cached in models/)
#   2. kvpred fit-predictor   fits the KV predictor between them (once)
#   3. kvpred up              starts aux-prefill, predictor and decoder as processes
#   4. kvpred client          sends the prompts in deploy/prompts.txt, prints the
#                             answers, each request's TTFT breakdown, and the
#                             baseline's TTFT (the decoder prefilling by itself) beside it
#   5. kvpred trace           merges the stages' trace logs into a Chrome trace
#
# Everything it writes goes to models/ and run/<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x build/kvpred ] || [ ! -x build/kvpred-decoder ]; then
  bash deploy/debian-setup.sh
fi
K=build/kvpred

$K models --dir models
if [ ! -f models/predictor.gguf ]; then
  $K fit-predictor --aux models/aux.gguf --base models/base.gguf -o models/predictor.gguf
fi

run=run/$(date +%Y%m%d-%H%M%S)
mkdir -p "$run"
port=${KVPRED_PORT:-7601}
$K up --dir models --port "$port" --trace-dir "$run/traces" --ready-file "$run/ready" \
  >"$run/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  [ -s "$run/ready" ] && break
  if ! kill -0 "$up" 2>/dev/null; then
    echo "kvpred up failed:" >&2
    cat "$run/up.log" >&2
    exit 1
  fi
  sleep 0.1
done
[ -s "$run/ready" ] || { echo "kvpred up did not come up in 60 s" >&2; exit 1; }
cat "$run/up.log"
echo

status=0
$K client -e "tcp://127.0.0.1:$port" -f deploy/prompts.txt -n 48 --greedy --trace --baseline \
  --json "$run/results.json" || status=$?
echo
kill "$up"
wait "$up" 2>/dev/null || true
trap - EXIT
$K trace "$run"/traces/*.trace -o "$run/trace.json" | tail -n 12
echo
echo "run files: $run (trace.json opens in https://ui.perfetto.dev or chrome://tracing)"
exit "$status"
