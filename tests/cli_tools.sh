#!/usr/bin/env bash
# The kvpred command driven as a user would: make a model, inspect it,
# tokenize, generate; and the one-line errors of bad input.
# usage: cli_tools.sh KVPRED WORKDIR
set -u
KVPRED=$1
DIR=$2
rm -rf "$DIR" && mkdir -p "$DIR"
fails=0 passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }
# expect CODE PATTERN -- cmd...: exit code and a stderr/stdout pattern
expect() {
  local code=$1 pat=$2; shift 3
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [ "$rc" -ne "$code" ]; then bad "$* exited $rc, wanted $code: $out"; return; fi
  if ! grep -qE -- "$pat" <<<"$out"; then bad "$*: output lacks /$pat/: $out"; return; fi
  ok
}

M=$DIR/m.gguf
expect 0 "wrote .*m.gguf" -- "$KVPRED" make-model -o "$M" --layers 2 --embd 64 --heads 4 --kv-heads 2 --type f16
expect 0 "llama.block_count" -- "$KVPRED" info "$M"
expect 0 "blk.1.ffn_down.weight" -- "$KVPRED" info "$M"

# tokenize round trip, including bytes that are not UTF-8
printf 'def f(x):\n    return x\xff\x00 + 1' >"$DIR/in.bin"
ids=$("$KVPRED" tokenize -m "$M" <"$DIR/in.bin")
"$KVPRED" tokenize -m "$M" --decode -p "$ids" >"$DIR/out.bin"
cmp -s "$DIR/in.bin" "$DIR/out.bin" && ok || bad "tokenize --decode did not give the input back"

# greedy generation is deterministic; sampling is reproducible with a seed
a=$("$KVPRED" generate -m "$M" -p "hello" -n 20 --greedy 2>/dev/null)
b=$("$KVPRED" generate -m "$M" -p "hello" -n 20 --greedy 2>/dev/null)
[ -n "$a" ] && [ "$a" = "$b" ] && ok || bad "greedy generation differs between runs"
a=$("$KVPRED" generate -m "$M" -p "hello" -n 20 --seed 7 2>/dev/null)
b=$("$KVPRED" generate -m "$M" -p "hello" -n 20 --seed 7 2>/dev/null)
c=$("$KVPRED" generate -m "$M" -p "hello" -n 20 --seed 8 2>/dev/null)
[ "$a" = "$b" ] && ok || bad "same seed, different text"
[ "$a" != "$c" ] && ok || bad "different seeds, same text"
expect 0 "TTFT" -- "$KVPRED" generate -m "$M" -p "hello" -n 5 --stats
expect 0 "OpenBLAS .* kernels" -- "$KVPRED" generate -m "$M" -p "hello" -n 5 --stats

# bad input: a one-line reason and a non-zero exit, never a crash
head -c 1000 "$M" >"$DIR/trunc.gguf"
expect 1 "truncated|offset" -- "$KVPRED" info "$DIR/trunc.gguf"
expect 1 "truncated|offset" -- "$KVPRED" generate -m "$DIR/trunc.gguf" -p hi
expect 1 "No such file|cannot open" -- "$KVPRED" generate -m "$DIR/none.gguf" -p hi
printf 'not a gguf file at all' >"$DIR/junk.gguf"
expect 1 "magic" -- "$KVPRED" info "$DIR/junk.gguf"
expect 2 "--n-predict" -- "$KVPRED" generate -m "$M" -p hi -n -3
expect 2 "--top-p" -- "$KVPRED" generate -m "$M" -p hi --top-p 2
expect 2 "usage" -- "$KVPRED" generate -p hi
expect 2 "unknown command" -- "$KVPRED" frobnicate
expect 1 "id|range" -- "$KVPRED" tokenize -m "$M" --decode -p "1 2 99999"
expect 2 "type" -- "$KVPRED" make-model -o "$DIR/x.gguf" --type q4_0
for sub in generate info tokenize make-model bench; do
  expect 0 "usage" -- "$KVPRED" "$sub" --help
done
expect 0 "generate" -- "$KVPRED" --help

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
