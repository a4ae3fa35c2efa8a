#!/usr/bin/env bash
# The pipeline as real processes (kvpred up, the kvpred-<stage> programs) over
# tcp and ipc: its greedy answers equal in-process KV Prediction's, with
# several clients at once; traces are complete and add up; a predictor made
# for another model is refused at the handshake with the field named; a
# silent (stopped) decoder gives a named error in time; a dead stage brings
# `kvpred up` down with its name.
# usage: cli_pipeline.sh KVPRED WORKDIR
set -u
KVPRED=$1
DIR=$2
BIN=$(dirname "$KVPRED")
rm -rf "$DIR" && mkdir -p "$DIR" && cd "$DIR" || exit 1
fails=0 passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }
pids=()
cleanup() { for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
PORT=$((20000 + $$ % 20000))

"$KVPRED" make-model -o base.gguf --layers 3 --embd 96 --heads 4 --kv-heads 2 --seed 1 >/dev/null
"$KVPRED" make-model -o other.gguf --layers 3 --embd 96 --heads 4 --kv-heads 2 --seed 2 >/dev/null

wait_ready() { # FILE PID
  for _ in $(seq 300); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ---- tcp: answers equal in-process generation, several clients at once
"$KVPRED" up --aux base.gguf --base base.gguf --identity --port "$PORT" --trace-dir traces \
  --chunk 16 --ready-file ready.tcp >up.log 2>&1 &
up=$!
pids+=("$up")
if wait_ready ready.tcp "$up"; then ok; else bad "kvpred up (tcp) did not come up: $(cat up.log)"; fi
EP=tcp://127.0.0.1:$PORT
prompts=("def fibonacci(n):" "import os" "class Stack:\n    def push(self, x):" "x")
for i in "${!prompts[@]}"; do
  p=$(printf '%b' "${prompts[$i]}")
  want=$("$KVPRED" generate --aux base.gguf --base base.gguf --predictor identity -p "$p" -n 24 --greedy --ignore-eos 2>/dev/null)
  got=$("$KVPRED" client -e "$EP" -p "$p" -n 24 --greedy 2>&1)
  [ "$got" = "$want" ] && ok || bad "prompt $i: pipeline '$got' != in-process '$want'"
  printf '%s\n' "${prompts[$i]}" >>prompts.txt
done
# four at once, from one client; then from four client processes
"$KVPRED" client -e "$EP" -f prompts.txt -n 24 --greedy --concurrency 4 --trace --json all.json >multi.out 2>&1 \
  && ok || bad "concurrent client failed: $(cat multi.out)"
for i in 0 1 2 3; do
  p=$(printf '%b' "${prompts[$i]}")
  "$KVPRED" client -e "$EP" -p "$p" -n 24 --greedy >"par$i.out" 2>&1 &
done
wait_pids=$(jobs -p | grep -v "^$up\$")
for j in $wait_pids; do wait "$j" || bad "a parallel client failed"; done
for i in 0 1 2 3; do
  p=$(printf '%b' "${prompts[$i]}")
  want=$("$KVPRED" generate --aux base.gguf --base base.gguf --predictor identity -p "$p" -n 24 --greedy --ignore-eos 2>/dev/null)
  [ "$(cat "par$i.out")" = "$want" ] && ok || bad "parallel client $i: '$(cat "par$i.out")' != '$want'"
done
grep -q "incomplete" multi.out && bad "incomplete trace: $(cat multi.out)" || ok
[ "$(grep -c '^r[0-9]' multi.out)" -eq 4 ] && ok || bad "trace table lacks requests: $(cat multi.out)"
"$KVPRED" client -e "$EP" -p "hello" -n 4 --mode baseline --greedy >/dev/null 2>&1 && ok || bad "baseline mode failed"
"$KVPRED" client -e "$EP" -p "hello" -n 4 --mode aux-only --greedy >/dev/null 2>&1 && ok || bad "aux-only mode failed"
kill "$up"; wait "$up" 2>/dev/null
"$KVPRED" trace traces/*.trace -o trace.json >trace.out 2>&1 && ok || bad "kvpred trace failed: $(cat trace.out)"
grep -q "max |sum - TTFT| = 0 ns" trace.out && ok || bad "parts do not sum to TTFT: $(cat trace.out)"
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' trace.json 2>/dev/null && ok || bad "trace.json is not JSON"

# ---- ipc
# (its stages with per-stage BLAS threads and pinned to CPU 0)
"$KVPRED" up --aux base.gguf --base base.gguf --identity --transport ipc --ready-file ready.ipc \
  --threads 1,1,2 --cpus 0 >up-ipc.log 2>&1 &
up=$!
pids+=("$up")
if wait_ready ready.ipc "$up"; then ok; else bad "kvpred up (ipc) did not come up: $(cat up-ipc.log)"; fi
pp=$(awk '$1 == "predictor" {print $3}' up-ipc.log)
grep -q "^Cpus_allowed_list:[[:space:]]*0$" "/proc/$pp/status" 2>/dev/null && ok \
  || bad "predictor (pid '$pp') not pinned to CPU 0: $(grep Cpus_allowed_list "/proc/$pp/status" 2>&1)"
IPC=$(cat ready.ipc)
want=$("$KVPRED" generate --aux base.gguf --base base.gguf --predictor identity -p "import os" -n 24 --greedy --ignore-eos 2>/dev/null)
got=$("$KVPRED" client -e "$IPC" -p "import os" -n 24 --greedy 2>&1)
[ "$got" = "$want" ] && ok || bad "ipc: '$got' != '$want'"
# bad per-stage settings are refused before anything starts
"$KVPRED" up --threads 1,2 >bad-up.log 2>&1; rc=$?
[ "$rc" -eq 2 ] && grep -q -- "--threads wants" bad-up.log && ok || bad "up --threads 1,2: rc $rc $(cat bad-up.log)"
"$(dirname "$KVPRED")/kvpred-predictor" --identity base.gguf --cpus 2-1 >bad-cpus.log 2>&1; rc=$?
[ "$rc" -eq 2 ] && grep -q "is not a CPU list" bad-cpus.log && ok || bad "predictor --cpus 2-1: rc $rc $(cat bad-cpus.log)"
# a dead stage takes kvpred up down, named
dec=$(awk '$1 == "decoder" {print $3}' up-ipc.log)
kill -9 "$dec"
for _ in $(seq 50); do kill -0 "$up" 2>/dev/null || break; sleep 0.1; done
wait "$up"; rc=$?
[ "$rc" -ne 0 ] && grep -q "decoder (pid $dec) exited" up-ipc.log && ok || bad "kvpred up after a dead decoder: rc $rc, $(cat up-ipc.log)"

# ---- a predictor for another model is refused at the handshake, field named
P2=$((PORT + 10))
"$BIN/kvpred-decoder" --model base.gguf --listen tcp://127.0.0.1:$((P2 + 2)) 2>dec.log & pids+=("$!")
"$BIN/kvpred-predictor" --identity other.gguf --listen tcp://127.0.0.1:$((P2 + 1)) --downstream tcp://127.0.0.1:$((P2 + 2)) 2>pred.log & pids+=("$!")
"$BIN/kvpred-aux-prefill" --model base.gguf --listen tcp://127.0.0.1:$P2 --downstream tcp://127.0.0.1:$((P2 + 1)) 2>aux.log & pids+=("$!")
sleep 1
out=$("$KVPRED" client -e tcp://127.0.0.1:$P2 -p "hello" -n 4 --greedy 2>&1); rc=$?
[ "$rc" -ne 0 ] && grep -q "aux_fingerprint" <<<"$out" && ok || bad "mismatch not refused by name: rc $rc: $out"
grep -q "aux_fingerprint differs" aux.log pred.log && ok || bad "logs do not name the field: $(cat aux.log pred.log)"
cleanup; pids=()

# ---- a silent decoder: a named error within the deadline, not a hang
P3=$((PORT + 20))
"$BIN/kvpred-decoder" --model base.gguf --listen tcp://127.0.0.1:$((P3 + 2)) 2>dec3.log & dec=$!; pids+=("$dec")
"$BIN/kvpred-predictor" --identity base.gguf --listen tcp://127.0.0.1:$((P3 + 1)) --downstream tcp://127.0.0.1:$((P3 + 2)) 2>pred3.log & pids+=("$!")
"$BIN/kvpred-aux-prefill" --model base.gguf --listen tcp://127.0.0.1:$P3 --downstream tcp://127.0.0.1:$((P3 + 1)) 2>aux3.log & pids+=("$!")
sleep 1
"$KVPRED" client -e tcp://127.0.0.1:$P3 -p "warm up" -n 2 --greedy >/dev/null 2>&1 && ok || bad "pipeline 3 does not answer"
kill -STOP "$dec"
start=$(date +%s%N)
out=$("$KVPRED" client -e tcp://127.0.0.1:$P3 -p "hello there" -n 8 --greedy --deadline-ms 8000 2>&1); rc=$?
took=$(( ($(date +%s%N) - start) / 1000000 ))
kill -CONT "$dec"
[ "$rc" -ne 0 ] && grep -qi "decoder" <<<"$out" && ok || bad "silent decoder: rc $rc: $out"
[ "$took" -lt 9000 ] && ok || bad "silent decoder: the error took $took ms"
cleanup; pids=()

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
