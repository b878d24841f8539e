#!/usr/bin/env bash
# Installs what kvtier builds with, from Debian 12 packages. Idempotent: does nothing
# when everything is there. Run as root (or with sudo available).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git
  librocksdb-dev liburing-dev libfaiss-dev libopenblas-dev liblapack-dev
  libboost-dev libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev libtomlplusplus-dev libxxhash-dev
  flatbuffers-compiler libflatbuffers-dev  # the kvtierd protocol (src/server/protocol)
  clang-14 libclang-rt-14-dev  # the protocol's libFuzzer target
  fio  # the baseline of `kvtier-bench disk` (the bench skips it when missing)
  python3-matplotlib python3-numpy  # `kvtier plot` (tools/plot.py)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# CUDA is optional: nvcc from /usr/local/cuda is used when present.
