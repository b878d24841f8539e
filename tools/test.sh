#!/usr/bin/env bash
# Installs the dependencies, builds and runs every test: first the release build (with
# the CUDA kernels when nvcc is found), then the same suite under ASan+UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-debian.sh
jobs=$(nproc)

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs"

# Sanitizers: CUDA off (its runtime and ASan's shadow memory do not mix), benchmarks off.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DKVTIER_CUDA=OFF \
  -DKVTIER_BUILD_BENCH=OFF -DKVTIER_SANITIZE=address,undefined
cmake --build build-asan -j "$jobs"
ctest --test-dir build-asan --output-on-failure -j "$jobs" -LE no-sanitizer

# The protocol's libFuzzer target (tests/fuzz: clang, ASan+UBSan), for a bounded time,
# from the seed corpus in tests/fuzz/corpus.
cmake -S tests/fuzz -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++-14
cmake --build build-fuzz -j "$jobs"
mkdir -p build-fuzz/corpus
build-fuzz/kvtier_protocol_fuzz -max_total_time=60 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix=build-fuzz/ -print_final_stats=1 build-fuzz/corpus tests/fuzz/corpus
