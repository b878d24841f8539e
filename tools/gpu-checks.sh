#!/bin/sh
# Every GPU check, on a GPU host, from the repository root, with the bundle that
# tools/gpu-bundle.sh made: the kernels against their CPU references, the GPU tier fed
# by a kvtierd process over CUDA IPC, and the device and sidecar benchmarks. Each step
# is bounded in time; the outputs go to $OUT (the device tool's folder) or ./gpu-out.
# About 5 minutes on an H200.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
run=.gpubundle/run
export KVTIER_KVTIERD="$PWD/.gpubundle/bin/kvtierd"
step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output, shows its tail
  name=$1
  seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
  echo "== $name: exit $?"
  tail -n 25 "$out/$name.txt"
}
nvidia-smi -L | tee "$out/gpu.txt"
step gpu_tests 240 $run kvtier_gpu_tests --gtest_color=no
step daemon_gpu_tests 120 $run kvtier_daemon_gpu_tests --gtest_color=no
step bench_gpu 120 $run kvtier-bench gpu --json
step bench_sidecar 180 $run kvtier-bench sidecar --kvtierd "$KVTIER_KVTIERD" --dir /tmp \
  --no-throughput --round-trips 2000 --json
