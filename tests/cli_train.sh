#!/usr/bin/env bash
# kvpred train / plot-loss / models driven as a user would: a tiny training
# run on a small corpus, the output model generating, --resume after a stop,
# the loss plot, and the one-line errors of bad input.
# usage: cli_train.sh KVPRED WORKDIR
set -u
KVPRED=$1
DIR=$2
rm -rf "$DIR" && mkdir -p "$DIR/corpus/sub"
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

for i in $(seq 1 30); do
  f=$DIR/corpus/mod$i.py
  [ $((i % 3)) -eq 0 ] && f=$DIR/corpus/sub/mod$i.py
  for j in $(seq 1 10); do printf 'def f%d_%d(x):\n    return x + %d\n\n' "$i" "$j" "$j"; done >"$f"
done
TINY=(--corpus "$DIR/corpus" --holdout 10 --layers 2 --embd 32 --heads 2 --ffn 64 --ctx 32
      --batch 4 --steps 30 --lr 0.01 --eval-every 10 --eval-tokens 512 --seed 3)

# a run, a progress display off a terminal, a log, a model that generates
expect 0 "wrote .*a.gguf: .* 30 steps" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/a.gguf"
expect 0 "step 30/30 100% loss [0-9.]+ val [0-9.]+ bpb" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/a2.gguf"
[ "$(wc -l <"$DIR/a.csv")" -eq 31 ] && ok || bad "a.csv should hold a header and 30 rows"
expect 0 "kvpred.train.val_bpb" -- "$KVPRED" info "$DIR/a.gguf"
expect 0 "." -- "$KVPRED" generate -m "$DIR/a.gguf" -p "def " -n 8 --greedy

# stop after 12 steps, resume: the same model as the uninterrupted run
expect 0 "stopped at step 12 of 30" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/b.gguf" --stop-after 12
[ ! -e "$DIR/b.gguf" ] && ok || bad "a stopped run must not write the model"
expect 0 "resumed from .*b.ckpt at step 12" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/b.gguf" --resume
# the tensors are the last 4 x n_params bytes of each file (F32)
n=$("$KVPRED" train "${TINY[@]}" -o "$DIR/a3.gguf" --quiet | sed -E 's/.*: ([0-9]+) parameters.*/\1/')
cmp -s <(tail -c $((n * 4)) "$DIR/a.gguf") <(tail -c $((n * 4)) "$DIR/b.gguf") && ok ||
  bad "resumed model's tensors differ from the uninterrupted run's"

# resuming with other settings, and from a broken checkpoint
expect 1 "written with lr=0.00999999978, this run has lr=0.0199999996" -- \
  "$KVPRED" train "${TINY[@]}" -o "$DIR/b.gguf" --resume --lr 0.02
head -c 1000 "$DIR/b.ckpt" >"$DIR/broken.ckpt"
expect 1 "truncated or corrupt" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/c.gguf" --ckpt "$DIR/broken.ckpt" --resume

# bad input
expect 2 "-o OUT.gguf is required" -- "$KVPRED" train --corpus "$DIR/corpus"
expect 2 "--layers: 'x' is not a whole number" -- "$KVPRED" train -o "$DIR/x.gguf" --layers x
expect 2 "--lr: '-1' is not a number" -- "$KVPRED" train -o "$DIR/x.gguf" --lr -1
expect 2 "--embd 30 is not a multiple of --heads 4" -- "$KVPRED" train -o "$DIR/x.gguf" --embd 30
expect 1 "corpus: /nonexistent: No such file or directory" -- "$KVPRED" train -o "$DIR/x.gguf" --corpus /nonexistent
expect 1 "no \*.rs files under" -- "$KVPRED" train -o "$DIR/x.gguf" --corpus "$DIR/corpus" --ext .rs
expect 1 "fewer than one window" -- "$KVPRED" train "${TINY[@]}" -o "$DIR/x.gguf" --ctx 65536

# the loss plot
if command -v gnuplot >/dev/null; then
  expect 0 "wrote .*loss.png" -- "$KVPRED" plot-loss "$DIR/a.csv" -o "$DIR/loss.png"
  [ "$(head -c 4 "$DIR/loss.png" | od -An -c | tr -d ' ')" = "211PNG" ] && ok || bad "loss.png is not a PNG"
  expect 0 "wrote .*two.png" -- "$KVPRED" plot-loss "$DIR/a.csv" "$DIR/b.csv" -o "$DIR/two.png"
else
  echo "note: gnuplot not installed: plot-loss drawing not tested"
fi
expect 1 "gnuplot is not installed: install the Debian package gnuplot-nox" -- \
  env PATH=/nonexistent "$KVPRED" plot-loss "$DIR/a.csv" -o "$DIR/none.png"
expect 1 "not a kvpred training log" -- "$KVPRED" plot-loss "$DIR/corpus/mod1.py" -o "$DIR/x.png"
expect 1 "cannot open .*nope.csv" -- "$KVPRED" plot-loss "$DIR/nope.csv" -o "$DIR/x.png"
expect 2 "usage: kvpred plot-loss" -- "$KVPRED" plot-loss "$DIR/a.csv"
expect 2 "unexpected argument" -- "$KVPRED" models extra

echo "cli_train: $passes passed, $fails failed"
[ "$fails" -eq 0 ]
