#!/usr/bin/env bash
# The README's "Running the sidecar", end to end: start kvtierd with a config like the
# README's, run the README's client example against its socket, stop the daemon with
# SIGTERM and check that it exits 0. With ARGS, the example is run as
# `EXAMPLE ARGS... SOCKET` instead (the C API test: a seed, then the daemon).
#   sidecar_example_test.sh KVTIERD EXAMPLE [ARGS...]
set -euo pipefail
kvtierd=$1
example=$2
shift 2
dir=$(mktemp -d /tmp/kvtier-readme-XXXXXX)
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/kvtierd.toml" <<TOML
[store]
directory = "$dir/store"
host_capacity = "64MiB"
disk_capacity = "256MiB"

[layout]
preset = "llama3-8b"

[metrics]
listen = ""
TOML
"$kvtierd" --config "$dir/kvtierd.toml" --check-config
"$kvtierd" --config "$dir/kvtierd.toml" 2> "$dir/kvtierd.log" &
pid=$!
for _ in $(seq 200); do [[ -S "$dir/store/kvtierd.sock" ]] && break; sleep 0.05; done
"$example" "$@" "$dir/store/kvtierd.sock"
kill -TERM $pid
wait $pid || { echo "kvtierd exited with $?"; cat "$dir/kvtierd.log"; exit 1; }
