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
