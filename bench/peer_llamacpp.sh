#!/usr/bin/env bash
# Peer benchmark: kvpred's prefill and decode speed next to llama.cpp's, on the
# same GGUF files, on this machine, in one run.
#
# llama.cpp comes from the npm package node-llama-cpp (v3), whose optional
# dependency @node-llama-cpp/<platform> ships prebuilt llama.cpp libraries with
# one ggml CPU backend per CPU family (ggml picks the best at load time). It is
# installed outside the repository, into $KVPRED_PEER_CACHE (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/kvpred-peer), from the npm registry only:
# install scripts are off, and node-llama-cpp is told never to build or
# download llama.cpp (NODE_LLAMA_CPP_SKIP_DOWNLOAD, build: "never").
#
# usage: bench/peer_llamacpp.sh [options] [FILE.gguf ...]
#   --threads N       threads for both engines (default 2)
#   --ctx N           llama.cpp context size (default 1024)
#   --batch N         llama.cpp batch size (default 512)
#   --prompt N        prompt tokens, random ids in [0, vocab) (default 512)
#   --decode N        decoded tokens (default 64)
#   --reps N          prefill repetitions after a warm-up, best kept (default 3)
#   --rounds N        times each engine is measured per file, alternating (default 2)
#   --types LIST      bench files when no FILE is given (default f32,f16,bf16)
#   --dir DIR         where `kvpred bench engine` writes them (default /tmp/kvpred-bench)
#   --flash-attn M    llama.cpp flash attention: auto, on or off (default auto)
#   --json FILE       also write every measurement and the summary as JSON
#   --install-only    install node-llama-cpp and check the tokenizer, no timing
#
# With no FILE, the files are DIR/bench-110m-TYPE.gguf that `kvpred bench
# engine` writes, and kvpred's figures come from `kvpred bench engine --types
# TYPE` run on the same file. A FILE not named bench-110m-TYPE.gguf is
# measured with llama.cpp only. Files without a tokenizer (kvpred's bench files
# have none, and llama.cpp refuses those) are given to llama.cpp as a
# temporary copy with kvpred's byte-level vocabulary padded to the model's
# vocab_size added; the tensors are the same bytes.
#
# Environment: KVPRED (default build/kvpred), KVPRED_PEER_CACHE, NLC_VERSION
# (npm version range of node-llama-cpp, default 3).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KVPRED=${KVPRED:-build/kvpred}
CACHE=${KVPRED_PEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpred-peer}
NLC_VERSION=${NLC_VERSION:-3}
MJS=$here/peer_llamacpp.mjs

threads=2 ctx=1024 batch=512 prompt=512 decode=64 reps=3 rounds=2
types=f32,f16,bf16 dir=/tmp/kvpred-bench fa=auto json= install_only=0
files=()
while (($#)); do
    case $1 in
    --threads) threads=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --prompt) prompt=$2; shift 2 ;;
    --decode) decode=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --flash-attn) fa=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    --install-only) install_only=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "peer_llamacpp.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
    esac
done

die() { echo "peer_llamacpp.sh: $*" >&2; exit 1; }
[[ -x $KVPRED ]] || die "no kvpred at $KVPRED (build it, or set KVPRED)"
command -v node >/dev/null && command -v npm >/dev/null || die "needs node (>= 20) and npm"
(($(node -p 'process.versions.node.split(".")[0]') >= 20)) || die "node-llama-cpp 3 needs node >= 20"

# ---- 1. node-llama-cpp, from the npm registry only ----
export NODE_LLAMA_CPP_SKIP_DOWNLOAD=true   # never fetch llama.cpp sources or binaries
export NODE_LLAMA_CPP_POSTINSTALL=skip      # and never build in a postinstall step
export NODE_LLAMA_CPP_GPU=false
case $(uname -s)-$(uname -m) in
Linux-x86_64) plat=linux-x64 ;;
Linux-aarch64) plat=linux-arm64 ;;
*) die "no prebuilt node-llama-cpp package chosen for $(uname -s)-$(uname -m)" ;;
esac
export PEER_NODE_MODULES=$CACHE/node_modules
if [[ ! -d $PEER_NODE_MODULES/@node-llama-cpp/$plat/bins ]]; then
    echo "installing node-llama-cpp@$NLC_VERSION into $CACHE ..."
    mkdir -p "$CACHE"
    [[ -f $CACHE/package.json ]] || echo '{"name":"kvpred-peer","private":true}' >"$CACHE/package.json"
    # --omit=optional skips the CUDA/Vulkan/other-platform binaries (~700 MB);
    # the CPU one for this platform is then installed by name, same version.
    (cd "$CACHE" && npm install --no-audit --no-fund --ignore-scripts --omit=optional \
        "node-llama-cpp@$NLC_VERSION" >"$CACHE/install.log" 2>&1) ||
        die "npm install node-llama-cpp failed, see $CACHE/install.log"
    ver=$(node -p "require('$PEER_NODE_MODULES/node-llama-cpp/package.json').version")
    (cd "$CACHE" && npm install --no-audit --no-fund --ignore-scripts --omit=optional \
        "@node-llama-cpp/$plat@$ver" >>"$CACHE/install.log" 2>&1) ||
        die "npm install @node-llama-cpp/$plat@$ver failed, see $CACHE/install.log"
fi
nlc_ver=$(node -p "require('$PEER_NODE_MODULES/node-llama-cpp/package.json').version")
echo "node-llama-cpp $nlc_ver, prebuilt binaries in $PEER_NODE_MODULES/@node-llama-cpp/$plat"

work=$(mktemp -d /tmp/kvpred-peer.XXXXXX)
trap 'rm -rf "$work"' EXIT
results=$work/results.jsonl
: >"$results"
load1() { cut -d' ' -f1 /proc/loadavg; }

# ---- 2. a kvpred-written model loads in llama.cpp and tokenizes the same ----
"$KVPRED" make-model -o "$work/tok.gguf" --layers 2 --embd 64 --heads 4 >/dev/null
samples=("Hello, world!" "def f(x):\n    return x * 2  # tabs\tand  spaces"
    "naïve café — 東京 🙂" "  leading and trailing  " "<|bos|> is text here" "a"
    "$(printf 'line1\nline2\r\n\x01\x7f end')")
tok_ok=0 tok_n=0 tok_info=
for s in "${samples[@]}"; do
    s=$(printf '%b' "$s")
    tok_n=$((tok_n + 1))
    k=$("$KVPRED" tokenize -m "$work/tok.gguf" -p "$s")
    ks=$("$KVPRED" tokenize -m "$work/tok.gguf" -p "$s" --special)
    j=$(node "$MJS" tokenize --model "$work/tok.gguf" --text "$s" --log "$work/tok.log") ||
        die "llama.cpp could not load kvpred's make-model file (see the error above)"
    tok_info=$j
    l=$(node -e 'const j=JSON.parse(process.argv[1]);console.log(j.tokens.join(" "))' "$j")
    ls=$(node -e 'const j=JSON.parse(process.argv[1]);console.log((j.adds_bos?[j.bos]:[]).concat(j.tokens).join(" "))' "$j")
    rt=$(node -e 'console.log(JSON.parse(process.argv[1]).detokenized_equal)' "$j")
    if [[ $k == "$l" && $ks == "$ls" && $rt == true ]]; then
        tok_ok=$((tok_ok + 1))
    else
        echo "tokenizer MISMATCH on $(printf '%q' "$s"):" >&2
        echo "  kvpred    $k | --special $ks" >&2
        echo "  llama.cpp $l | with BOS  $ls | detokenizes back: $rt" >&2
    fi
done
echo "tokenizer: llama.cpp loads kvpred's make-model file; $tok_ok/$tok_n sample strings tokenize" \
    "identically (plain and with BOS) and detokenize back"
node -e '
const j=JSON.parse(process.argv[1]);
console.log(`llama.cpp ${j.llama_cpp_release} (${j.build_type} binaries), CPU backend ${j.cpu_backend}`);
console.log(`  ${j.system_info}`);' "$tok_info"
node -e '
const j=JSON.parse(process.argv[1]);
console.log(JSON.stringify({kind:"meta", node_llama_cpp:j.node_llama_cpp, llama_cpp_release:j.llama_cpp_release,
  build_type:j.build_type, cpu_backend:j.cpu_backend, system_info:j.system_info}));' "$tok_info" >>"$results"
printf '{"kind":"meta","tokenizer_check":{"identical":%d,"samples":%d},"cpu":"%s","nproc":%d,"threads":%d,"ctx":%d,"batch":%d,"prompt":%d,"decode":%d,"reps":%d,"rounds":%d}\n' \
    "$tok_ok" "$tok_n" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" "$(nproc)" \
    "$threads" "$ctx" "$batch" "$prompt" "$decode" "$reps" "$rounds" >>"$results"
((install_only)) && { ((tok_ok == tok_n)) || exit 1; exit 0; }

# ---- 3. the files, and which of them kvpred's own bench can measure ----
if ((${#files[@]} == 0)); then
    IFS=, read -ra tl <<<"$types"
    missing=0
    for t in "${tl[@]}"; do
        files+=("$dir/bench-110m-$t.gguf")
        [[ -f $dir/bench-110m-$t.gguf ]] || missing=1
    done
    if ((missing)); then
        echo "making the bench files: $KVPRED bench engine --reps 1 --types $types --dir $dir"
        "$KVPRED" bench engine --reps 1 --types "$types" --dir "$dir" >"$work/make.log" 2>&1 ||
            die "kvpred bench engine failed: $(tail -1 "$work/make.log")"
    fi
fi
for f in "${files[@]}"; do [[ -f $f ]] || die "no such file: $f"; done
kv_type() { # the type kvpred's bench engine measures for this file, or nothing
    [[ $(basename "$1") =~ ^bench-110m-(f32|f16|bf16|q8_0)\.gguf$ ]] && echo "${BASH_REMATCH[1]}" || true
}

run_kvpred() { # round file
    local t d l0 l1
    t=$(kv_type "$2") d=$(dirname "$2")
    l0=$(load1)
    OPENBLAS_NUM_THREADS=$threads "$KVPRED" bench engine --types "$t" --dir "$d" --prompt "$prompt" \
        --decode "$decode" --reps "$reps" --json "$work/k.json" >"$work/k.log" 2>&1 ||
        die "kvpred bench engine failed: $(tail -1 "$work/k.log")"
    l1=$(load1)
    node -e '
const [f,round,label,l0,l1]=process.argv.slice(1); const j=JSON.parse(require("fs").readFileSync(f,"utf8")); const r=j.results[0];
console.log(JSON.stringify({kind:"measurement",round:+round,label,engine:"kvpred",type:r.type,blas_core:j.blas_core,
 threads:j.blas_threads,load_s:r.load_s,prefill_ms:r.prefill_ms,prefill_tokens_per_s:r.prefill_tokens_per_s,
 decode_tokens_per_s:r.decode_tokens_per_s,load_before:+l0,load_after:+l1}));' \
        "$work/k.json" "$1" "$(basename "$2")" "$l0" "$l1" >>"$results"
}

declare -A llfile
prepare_llama() { # file: llama.cpp gets a copy with a vocabulary if it has none
    local out
    out=$(node "$MJS" add-vocab --in "$1" --out "$work/$(basename "$1" .gguf).vocab.gguf") ||
        die "cannot read $1 as GGUF"
    llfile[$1]=$(node -e 'console.log(JSON.parse(process.argv[1]).out)' "$out")
}

run_llama() { # round file
    local l0 l1 j
    [[ -n ${llfile[$2]:-} ]] || prepare_llama "$2"
    l0=$(load1)
    j=$(node "$MJS" bench --model "${llfile[$2]}" --threads "$threads" --ctx "$ctx" --batch "$batch" \
        --prompt "$prompt" --decode "$decode" --reps "$reps" --flash-attn "$fa" \
        --log "$work/llama-$(basename "$2" .gguf)-$1.log") || die "llama.cpp bench of $2 failed"
    l1=$(load1)
    node -e '
const [j,round,label,l0,l1,src]=process.argv.slice(1); const r=JSON.parse(j);
console.log(JSON.stringify({kind:"measurement",round:+round,label,engine:"llama.cpp",file:src,vocab_added:r.model!==src,
 cpu_backend:r.cpu_backend,flash_attention:r.flash_attention,threads:r.threads,context:r.context,batch:r.batch,
 load_s:r.load_s,prefill_ms:r.prefill_ms,prefill_tokens_per_s:r.prefill_tokens_per_s,
 decode_tokens_per_s:r.decode_tokens_per_s,load_before:+l0,load_after:+l1}));' \
        "$j" "$1" "$(basename "$2")" "$l0" "$l1" "$2" >>"$results"
}

# ---- 4. alternate the engines: kvpred first in odd rounds (its bench also
# rewrites the file llama.cpp then reads), llama.cpp first in even ones ----
echo "measuring: ${#files[@]} file(s) x $rounds round(s), $threads threads, prompt $prompt," \
    "decode $decode, best of $reps after a warm-up"
for ((r = 1; r <= rounds; r++)); do
    for f in "${files[@]}"; do
        t=$(kv_type "$f")
        echo "  round $r $(basename "$f")  (load $(load1))"
        if [[ -z $t ]]; then
            run_llama "$r" "$f"
        elif ((r % 2)); then
            run_kvpred "$r" "$f"
            run_llama "$r" "$f"
        else
            run_llama "$r" "$f"
            run_kvpred "$r" "$f"
        fi
    done
done
echo
node "$MJS" report --in "$results" ${json:+--json "$json"}
((tok_ok == tok_n)) || exit 1
