#!/usr/bin/env bash
# Installs the dependencies, builds and runs every test: first the release build (with
# the CUDA kernels when nvcc is found), then the same suite under ASan+UBSan, then the
# concurrent parts under TSan, then a bounded fuzz run.
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

# ThreadSanitizer over the concurrent parts only (a whole-suite TSan build would not fit
# CI's time): the sidecar client and kvtierd's serving core (the tests labelled tsan,
# tests/client.cmake; kvtier_server_tests), and the worker pool, the store's concurrency
# tests and the GPU tier (its prefetch thread) of kvtier_tests. -O1 -g1: quicker to
# build than -O2, with line numbers in the reports.
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DKVTIER_CUDA=OFF -DKVTIER_BUILD_BENCH=OFF -DKVTIER_BUILD_TOOLS=OFF -DKVTIER_SANITIZE=thread
cmake --build build-tsan -j "$jobs" --target kvtier_client_tests kvtier_server_tests kvtier_tests
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
ctest --test-dir build-tsan --output-on-failure -j "$jobs" -L tsan
build-tsan/tests/kvtier_server_tests
build-tsan/tests/kvtier_tests \
  --gtest_filter='WorkerPoolTest.*:StoreConcurrencyTest.*:StoreQuotaTest.Concurrent*:DeviceCacheTest.*:StoreDeviceTest.*'
unset TSAN_OPTIONS

# The protocol's libFuzzer target (tests/fuzz: clang, ASan+UBSan), for a bounded time,
# from the seed corpus in tests/fuzz/corpus.
cmake -S tests/fuzz -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++-14
cmake --build build-fuzz -j "$jobs"
mkdir -p build-fuzz/corpus
build-fuzz/kvtier_protocol_fuzz -max_total_time=60 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix=build-fuzz/ -print_final_stats=1 build-fuzz/corpus tests/fuzz/corpus
