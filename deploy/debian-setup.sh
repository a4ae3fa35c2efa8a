#!/usr/bin/env bash
# Installs the Debian 12 packages kvpred needs (as root, or through sudo) and
# builds it into build/ (Release). Safe to run again: it only installs what is
# missing and rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config
  libopenblas-dev liblapacke-dev   # GEMM, and LAPACK for the predictor's ridge fit
  libpcre2-dev                     # the GPT-2 / Llama 3 pre-tokenizer regexes
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libmsgpack-dev  # the pipeline
  libcmocka-dev                    # tests
  libpython3.11-stdlib libpython3.11-minimal  # the default training corpus
  gnuplot-nox                      # kvpred plot-loss
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "kvpred: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
