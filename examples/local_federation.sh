#!/usr/bin/env bash
# A federation on this machine: a coordinator and 4 edge clients on loopback, talking mutual
# TLS 1.3 with development certificates. Trains the MLP for a few rounds on MNIST-10k (each
# client computes its own IID share of the training set) and prints the per-round metrics.
#
#   examples/local_federation.sh [ROUNDS] [MODEL]
#
# Needs a build (scripts/build.sh) and the data (scripts/fetch_mnist.sh). Output goes to
# out/local-federation/. Every process started here is stopped on exit, also on failure or
# Ctrl-C.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FEDSLICE_BUILD_DIR:-$root/build}
rounds=${1:-5}
model=${2:-mlp}
clients=4
out=$root/out/local-federation
data=$root/data/mnist-10k

# shellcheck source=SCRIPTDIR/../scripts/lib/local_processes.sh
source "$root/scripts/lib/local_processes.sh"
require_executables "$build/coordinator/fedslice-coordinator" "$build/client/fedslice-client"

rm -rf "$out/run"
mkdir -p "$out/logs"
bash "$root/scripts/make_certs.sh" "$out/certs" "$clients" >/dev/null

rm -f "$out/port"
start_background "$out/logs/coordinator.log" "$build/coordinator/fedslice-coordinator" \
  --ca "$out/certs/ca.pem" --cert "$out/certs/coordinator.pem" --key "$out/certs/coordinator.key" \
  --bind 127.0.0.1 --port 0 --port-file "$out/port" \
  --model "$model" --data "$data" --rounds "$rounds" --fraction 1 --min-fit 3 \
  --min-available "$clients" --epochs 1 --batch 10 --lr 0.05 --round-deadline-ms 120000 \
  --out-dir "$out/run" --save-model "$out/global.pb"
coordinator=${pids[-1]}
port=$(wait_for_port "$out/port" "$out/logs/coordinator.log")
echo "coordinator on 127.0.0.1:$port; starting $clients clients"

threads=$(( $(nproc) / clients )); (( threads >= 1 )) || threads=1
for i in $(seq 0 $((clients - 1))); do
  start_background "$out/logs/client-$i.log" "$build/client/fedslice-client" \
    --coordinator "127.0.0.1:$port" \
    --ca "$out/certs/ca.pem" --cert "$out/certs/client-$i.pem" --key "$out/certs/client-$i.key" \
    --data "$data" --partition iid --partition-seed 1 --index "$i" --count "$clients" \
    --threads "$threads"
done

if ! wait "$coordinator"; then
  echo "coordinator failed; its log:" >&2
  tail -n 30 "$out/logs/coordinator.log" >&2
  exit 1
fi
echo "== per-round metrics ($out/run/metrics.csv)"
column -s, -t < "$out/run/metrics.csv" 2>/dev/null || cat "$out/run/metrics.csv"
echo "== final global model: $out/global.pb"
"$build/tools/fedslice" eval --model-file "$out/global.pb" --data "$data"
