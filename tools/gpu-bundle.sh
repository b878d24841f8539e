#!/usr/bin/env bash
# Builds the GPU checks with CUDA for compute capability 9.0 (H100, H200) and packs them,
# with kvtierd and the benchmark, into .gpubundle for a GPU host (../shared/gpu/README.md):
#   bash tools/gpu-bundle.sh [BUILD_DIR]     here (default build-gpu)
#   bash tools/gpu-checks.sh                 there, from the repository root
# The bundle stays out of git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-gpu}
bundle=../shared/gpu/bundle.sh
[[ -x $bundle ]] || { echo "gpu-bundle: $bundle not found (see ../shared/gpu)" >&2; exit 2; }
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVTIER_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DKVTIER_BUILD_TESTS=ON -DKVTIER_BUILD_BENCH=ON \
  -DKVTIER_BUILD_TOOLS=ON
cmake --build "$build" -j "$(nproc)" \
  --target kvtier_gpu_tests kvtier_daemon_gpu_tests kvtierd kvtier-bench
"$bundle" .gpubundle "$build/tests/kvtier_gpu_tests" "$build/tests/kvtier_daemon_gpu_tests" \
  "$build/src/server/kvtierd" "$build/bench/kvtier-bench"
# Debian's BLAS alternative resolves to OpenBLAS (35 MiB), which would take the bundle
# past the 64 MiB a device run carries: the reference BLAS and LAPACK instead, when
# installed (only FAISS's CPU paths call them; the GPU checks time nothing there).
lib=/usr/lib/x86_64-linux-gnu
if [[ -e $lib/blas/libblas.so.3 && -e $lib/lapack/liblapack.so.3 ]]; then
  cp -L "$lib/blas/libblas.so.3" "$lib/lapack/liblapack.so.3" .gpubundle/lib/
  if ! objdump -p .gpubundle/bin/* .gpubundle/lib/* | grep -q 'NEEDED.*libopenblas'; then
    rm -f .gpubundle/lib/libopenblas*
  fi
fi
du -sh .gpubundle | sed "s/^/gpu-bundle: /"
grep -qx '/.gpubundle/' .git/info/exclude 2>/dev/null || echo '/.gpubundle/' >>.git/info/exclude
