#!/usr/bin/env bash
# Split inference across 3 local edge clients: the coordinator plans the model's slices over
# the clients' measured device profiles, sends each client its slice's weights, and the
# requester (`fedslice infer`) streams the 2,000 MNIST-10k test images through the pipeline
# client A -> client B -> client C over mutual TLS 1.3; activations go stage to stage, never
# through the coordinator. Prints the plan, the throughput and the accuracy.
#
#   examples/split_inference.sh [MODEL_FILE] [-- extra fedslice infer flags]
#
# MODEL_FILE: a model saved by `fedslice train --out` or the coordinator's --save-model (the
# demo passes the CNN it trained). Without it, the federation first trains the mlp for 3 rounds
# and then serves the model it trained. Set FEDSLICE_SLOWDOWN=4 to make every client behave as
# a device 4x slower than this machine (emulation: each stage waits 3x its compute time), and
# FEDSLICE_ACTIVATIONS=int8 to compress the activations between stages.
#
# Needs a build (scripts/build.sh) and the data (scripts/fetch_mnist.sh). Output goes to
# out/split-inference/. Every process started here is stopped on exit, also on failure or
# Ctrl-C.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FEDSLICE_BUILD_DIR:-$root/build}
model_file=""
if [[ $# -gt 0 && "$1" != "--" ]]; then model_file=$1; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
clients=3
out=$root/out/split-inference
data=$root/data/mnist-10k
slowdown=${FEDSLICE_SLOWDOWN:-1}
activations=${FEDSLICE_ACTIVATIONS:-fp32}

# shellcheck source=SCRIPTDIR/../scripts/lib/local_processes.sh
source "$root/scripts/lib/local_processes.sh"
require_executables "$build/coordinator/fedslice-coordinator" "$build/client/fedslice-client" \
  "$build/tools/fedslice"
if [[ -n "$model_file" && ! -f "$model_file" ]]; then
  echo "model file $model_file not found" >&2
  exit 1
fi

rm -rf "$out/run"
mkdir -p "$out/logs"
# client-0..2 host the stages; client-3's certificate identifies the requester.
bash "$root/scripts/make_certs.sh" "$out/certs" $((clients + 1)) >/dev/null

if [[ -n "$model_file" ]]; then
  training=(--rounds 0 --init-model "$model_file")
  echo "serving $model_file"
else
  training=(--model mlp --rounds 3 --fraction 1 --min-fit "$clients" --epochs 1 --batch 10
            --lr 0.05)
  echo "training the mlp for 3 rounds first"
fi
rm -f "$out/port"
start_background "$out/logs/coordinator.log" "$build/coordinator/fedslice-coordinator" \
  --ca "$out/certs/ca.pem" --cert "$out/certs/coordinator.pem" --key "$out/certs/coordinator.key" \
  --bind 127.0.0.1 --port 0 --port-file "$out/port" --data "$data" \
  --min-available "$clients" --round-deadline-ms 120000 --out-dir "$out/run" --serve \
  "${training[@]}"
port=$(wait_for_port "$out/port" "$out/logs/coordinator.log")

threads=1
(( $(nproc) >= 2 * clients )) && threads=$(( $(nproc) / clients ))
# Clients start one after the other: each measures its layer times (its device profile, which
# the planner uses) while the others are idle.
for i in $(seq 0 $((clients - 1))); do
  start_background "$out/logs/client-$i.log" "$build/client/fedslice-client" \
    --coordinator "127.0.0.1:$port" \
    --ca "$out/certs/ca.pem" --cert "$out/certs/client-$i.pem" --key "$out/certs/client-$i.key" \
    --data "$data" --partition iid --partition-seed 1 --index "$i" --count "$clients" \
    --threads "$threads" --stage-port 0 --slowdown "$slowdown" --device-name "edge-$i"
  wait_for_profiles $((i + 1)) "$out/logs/coordinator.log" "$out/logs/client-$i.log"
done
echo "coordinator on 127.0.0.1:$port; $clients clients hosting stages (slowdown $slowdown)"

"$build/tools/fedslice" infer --coordinator "127.0.0.1:$port" --server-name fedslice-coordinator \
  --ca "$out/certs/ca.pem" --cert "$out/certs/client-$clients.pem" \
  --key "$out/certs/client-$clients.key" --data "$data" --stages "$clients" \
  --activations "$activations" "$@"
