#!/usr/bin/env bash
# kvpred prune / eval driven as a user would, on tiny random models and a
# corpus of small Python files: a pruned and fine-tuned base, the quick
# evaluation with in-process predictor fits, its files and image, a rerun
# with the saved predictor and a fake train-kvp prefix, and the one-line
# errors of bad input.
# usage: cli_eval.sh KVPRED WORKDIR
set -u
KVPRED=$1
DIR=$2
rm -rf "$DIR" && mkdir -p "$DIR/corpus"
fails=0 passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }
# expect CODE PATTERN -- cmd...: exit code and a stdout/stderr pattern
expect() {
  local code=$1 pat=$2; shift 3
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [ "$rc" -ne "$code" ]; then bad "$* exited $rc, wanted $code: $out"; return; fi
  if ! grep -qE -- "$pat" <<<"$out"; then bad "$*: output lacks /$pat/: $out"; return; fi
  ok
}

# 40 files of functions with docstrings: with --holdout 10 a few land in test
for i in $(seq 1 40); do
  for j in $(seq 1 6); do
    printf 'def f%d_%d(x, y):\n    """Return x plus %d."""\n    z = x + %d\n    return z * y\n\n' \
      "$i" "$j" "$j" "$j"
  done >"$DIR/corpus/mod$i.py"
done
C=(--corpus "$DIR/corpus" --holdout 10)
"$KVPRED" make-model -o "$DIR/base.gguf" --layers 4 --embd 64 --heads 4 --kv-heads 2 --ctx 256 \
  --seed 1 --std 0.2 >/dev/null || bad "make-model base"
"$KVPRED" make-model -o "$DIR/aux.gguf" --layers 2 --embd 32 --heads 2 --ctx 256 --seed 2 \
  --std 0.2 >/dev/null || bad "make-model aux"

# prune: the kept layers, a short fine-tuning, the record in the file
expect 0 "kept layers \[0,2\] of 4" -- "$KVPRED" prune --base "$DIR/base.gguf" --keep 1/2 \
  -o "$DIR/p12.gguf" "${C[@]}" --finetune-steps 3 --batch 2 --ctx 32 --quiet
expect 0 "kvpred.prune.finetune_steps +u32 +3" -- "$KVPRED" info "$DIR/p12.gguf"
expect 0 "kvpred.prune.layers +i32\[2\] +\[0, 2\]" -- "$KVPRED" info "$DIR/p12.gguf"
expect 0 "kept layers \[0\] of 4" -- "$KVPRED" prune --base "$DIR/base.gguf" --keep 1/4 -o "$DIR/p14.gguf"
expect 0 "." -- "$KVPRED" generate -m "$DIR/p12.gguf" -p "def " -n 4 --greedy

# the quick evaluation: every method, the files, the goals
OUT=$DIR/out
expect 0 "kvp pruned 2/4 \(ridge\)" -- "$KVPRED" eval --base "$DIR/base.gguf" --aux "$DIR/aux.gguf" \
  --pruned "$DIR/p12.gguf" --pruned "$DIR/p14.gguf" "${C[@]}" --quick --out "$OUT"
[ "$(wc -l <"$OUT/results.csv")" -eq 8 ] && ok || bad "results.csv: a header and 7 methods wanted"
head -1 "$OUT/results.csv" | grep -q "^method,family,kind,ttft_flops,flops_vs_base,ttft_ms,continuation_acc" &&
  ok || bad "results.csv header"
grep -q '^"base",.*,1,' "$OUT/results.csv" && ok || bad "base at 1x its own FLOPs"
grep -q '^"kvp aux (ridge)",0,all,' "$OUT/cache_quality.csv" && ok || bad "cache quality per layer"
grep -q '^"kvp aux (ridge)",all,0,8,' "$OUT/cache_quality.csv" && ok || bad "cache quality per position"
grep -q "goals:" "$OUT/summary.txt" && ok || bad "summary.txt lacks the goals"
[ -s "$OUT/humaneval.csv" ] && ok || bad "humaneval.csv missing"
[ -s "$OUT/predictor-aux.gguf" ] && ok || bad "the fitted predictor is not saved"
if command -v gnuplot >/dev/null; then
  [ "$(head -c 4 "$OUT/eval.png" | od -An -c | tr -d ' ')" = "211PNG" ] && ok || bad "eval.png is no PNG"
fi

# again with the saved predictor and a train-kvp prefix (here: the same pair)
cp "$DIR/aux.gguf" "$DIR/tk-aux.gguf" && cp "$OUT/predictor-aux.gguf" "$DIR/tk-predictor.gguf"
expect 0 "kvp tk \(train-kvp\)" -- "$KVPRED" eval --base "$DIR/base.gguf" --aux "$DIR/aux.gguf" \
  --predictor "$OUT/predictor-aux.gguf" --kvp-trained "$DIR/tk" "${C[@]}" --quick --no-plot \
  --out "$DIR/out2"
grep -q "fitted a ridge" <("$KVPRED" eval --base "$DIR/base.gguf" --aux "$DIR/aux.gguf" \
  --predictor "$OUT/predictor-aux.gguf" "${C[@]}" --quick --no-plot --out "$DIR/out3" 2>&1) &&
  bad "a given predictor must not be fitted again" || ok

# bad input
expect 2 "--base and --out are required" -- "$KVPRED" eval --aux "$DIR/aux.gguf"
expect 2 "--predictor must follow" -- "$KVPRED" eval --predictor x.gguf --base "$DIR/base.gguf" --out "$DIR/x"
expect 2 "--keep: '5/4' is not a fraction" -- "$KVPRED" prune --base "$DIR/base.gguf" --keep 5/4 -o "$DIR/x.gguf"
expect 2 "--base, --keep and -o are required" -- "$KVPRED" prune --keep 1/2 -o "$DIR/x.gguf"
expect 1 "aux_fingerprint" -- "$KVPRED" eval --base "$DIR/base.gguf" --aux "$DIR/p12.gguf" \
  --predictor "$OUT/predictor-aux.gguf" "${C[@]}" --quick --no-plot --out "$DIR/x"
expect 1 "no test file holds" -- "$KVPRED" eval --base "$DIR/base.gguf" "${C[@]}" --quick \
  --prompt-len 60000 --out "$DIR/x"
expect 1 "nonexistent" -- "$KVPRED" eval --base "$DIR/nonexistent.gguf" --out "$DIR/x"

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
