#!/usr/bin/env bash
# kvpred's main job as it stands: generate text with the default model.
# Until the trainer lands, the default model is a random-weight one that
# `kvpred make-model` writes (and this script caches in models/); its text is
# noise, but every part of the engine runs for real: GGUF load, tokenizer,
# chunked prefill, sampling, streaming, statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/kvpred ] || bash deploy/debian-setup.sh
mkdir -p models
model=models/random-4l.gguf
[ -f "$model" ] || build/kvpred make-model -o "$model" --layers 4 --embd 256 --heads 8 --kv-heads 4
build/kvpred info "$model" | sed -n '1,4p'
build/kvpred generate -m "$model" -p "def fibonacci(n):" -n 48 --seed 1 --stats
