#!/usr/bin/env bash
# Runs every test: the Release build's, then the same tests built with
# AddressSanitizer and UndefinedBehaviorSanitizer (build-asan/), which is how
# leaks and undefined behaviour are kept out. Expects deploy/debian-setup.sh
# to have run (the README's test command does both).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== Release build: tests"
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== ASan+UBSan build: tests"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKVP_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"
