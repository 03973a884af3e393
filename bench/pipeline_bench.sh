#!/usr/bin/env bash
# Split-inference pipelines of 1, 2, 3 and 4 stages, each stage an emulated edge device N
# times slower than this host (default 4; `fedslice-client --slowdown`: a stage waits
# (N - 1) x its compute time per micro-batch), `cnn`, 2,000 MNIST-10k test images in
# micro-batches of 64, next to the planner's prediction.
#
#   bench/pipeline_bench.sh [STAGES...]        (default: 1 2 3 4)
#
# Environment: FEDSLICE_BUILD_DIR (build), FEDSLICE_BENCH_SLOWDOWN (4), FEDSLICE_BENCH_IMAGES
# (2000), FEDSLICE_BENCH_REPEAT (4: the images are streamed 4 times, so that filling and
# draining a 4-stage pipeline, 3 micro-batch times each, is ~2% of the run, not ~10%),
# FEDSLICE_BENCH_MICRO_BATCH (64), FEDSLICE_BENCH_ACTIVATIONS (fp32),
# FEDSLICE_BENCH_PROFILE_SECONDS (1: how long each client times its layers, `fedslice-client
# --profile-seconds`; longer can ride out a burst of other load that would make one client
# look slower than the identical others and unbalance the plans).
#
# Four clients run on this host with one engine thread each. They are started one after the
# other, each measuring its layer times while the others are idle, so that the profiles the
# planner uses are not inflated by a neighbour's measurement. Prints one row per pipeline:
# measured and predicted images/s, their ratio, the speed-up over the 1-stage pipeline (the
# issue's bar: >= 0.85 K for K balanced stages) and the latency per micro-batch, both in the
# full stream (queueing included) and through an idle pipeline (one micro-batch at a time,
# `fedslice infer --window 1`), next to the planner's latency.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FEDSLICE_BUILD_DIR:-$root/build}
slowdown=${FEDSLICE_BENCH_SLOWDOWN:-4}
images=${FEDSLICE_BENCH_IMAGES:-2000}
repeat=${FEDSLICE_BENCH_REPEAT:-4}
in_flight=${FEDSLICE_BENCH_IN_FLIGHT:-2}
micro=${FEDSLICE_BENCH_MICRO_BATCH:-64}
activations=${FEDSLICE_BENCH_ACTIVATIONS:-fp32}
profile_seconds=${FEDSLICE_BENCH_PROFILE_SECONDS:-1}
stages_list=("$@")
[[ ${#stages_list[@]} -gt 0 ]] || stages_list=(1 2 3 4)
clients=4
out=$root/out/pipeline-bench
data=$root/data/mnist-10k

# shellcheck source=SCRIPTDIR/../scripts/lib/local_processes.sh
source "$root/scripts/lib/local_processes.sh"
require_executables "$build/coordinator/fedslice-coordinator" "$build/client/fedslice-client" \
  "$build/tools/fedslice"
[[ -d "$data" ]] || { echo "missing $data: run scripts/fetch_mnist.sh first" >&2; exit 1; }

mkdir -p "$out/logs"
rm -rf "$out/run"
bash "$root/scripts/make_certs.sh" "$out/certs" $((clients + 1)) >/dev/null
if [[ ! -f "$out/cnn.pb" ]]; then
  echo "training a cnn for one epoch (the weights do not change the speed; accuracy is printed)"
  "$build/tools/fedslice" train --model cnn --data "$data" --epochs 1 --batch 32 --lr 0.01 \
    --momentum 0.9 --out "$out/cnn.pb" >"$out/logs/train.log" 2>&1
fi

rm -f "$out/port"
start_background "$out/logs/coordinator.log" "$build/coordinator/fedslice-coordinator" \
  --ca "$out/certs/ca.pem" --cert "$out/certs/coordinator.pem" --key "$out/certs/coordinator.key" \
  --bind 127.0.0.1 --port 0 --port-file "$out/port" --data "$data" --rounds 0 --serve \
  --init-model "$out/cnn.pb" --min-available 1 --min-fit 1 --out-dir "$out/run" --threads 1
port=$(wait_for_port "$out/port" "$out/logs/coordinator.log")

for i in $(seq 0 $((clients - 1))); do
  start_background "$out/logs/client-$i.log" "$build/client/fedslice-client" \
    --coordinator "127.0.0.1:$port" \
    --ca "$out/certs/ca.pem" --cert "$out/certs/client-$i.pem" --key "$out/certs/client-$i.key" \
    --data "$data" --partition iid --index "$i" --count "$clients" --threads 1 \
    --stage-port 0 --slowdown "$slowdown" --device-name "edge-$i" --profile-seconds "$profile_seconds"
  wait_for_profiles $((i + 1)) "$out/logs/coordinator.log" "$out/logs/client-$i.log"
done

echo "cnn, $images images x $repeat, micro-batch $micro, $activations activations, devices ${slowdown}x slower than this host ($(nproc) cores)"
printf "%-7s %12s %12s %9s %9s %9s %10s %10s %10s\n" stages "images/s" predicted "meas/pred" speed-up "bar" "p50 ms" "idle ms" "pred. ms"
base=""
for k in "${stages_list[@]}"; do
  log=$out/logs/infer-$k.log
  "$build/tools/fedslice" infer --coordinator "127.0.0.1:$port" --server-name fedslice-coordinator \
    --ca "$out/certs/ca.pem" --cert "$out/certs/client-$clients.pem" \
    --key "$out/certs/client-$clients.key" --data "$data" --limit "$images" --repeat "$repeat" --stages "$k" \
    --micro-batch "$micro" --activations "$activations" --in-flight "$in_flight" >"$log" 2>&1 ||
    { echo "fedslice infer --stages $k failed:" >&2; tail -20 "$log" >&2; exit 1; }
  # The latency of an idle pipeline, which is what the planner predicts: 16 micro-batches
  # sent one at a time (--window 1) through a pipeline of the same K.
  idle_log=$out/logs/infer-$k-idle.log
  "$build/tools/fedslice" infer --coordinator "127.0.0.1:$port" --server-name fedslice-coordinator \
    --ca "$out/certs/ca.pem" --cert "$out/certs/client-$clients.pem" \
    --key "$out/certs/client-$clients.key" --data "$data" --limit $((16 * micro)) --stages "$k" \
    --micro-batch "$micro" --activations "$activations" --in-flight "$in_flight" --window 1 \
    >"$idle_log" 2>&1 ||
    { echo "fedslice infer --stages $k --window 1 failed:" >&2; tail -20 "$idle_log" >&2; exit 1; }
  read -r measured predicted < <(sed -n 's/^throughput: \([0-9.]*\) images\/s (predicted \([0-9.]*\)).*/\1 \2/p' "$log")
  latency_re='s/^latency per micro-batch: p50 \([0-9.]*\) ms.*(predicted \([0-9.]*\) ms.*/\1 \2/p'
  read -r p50 _ < <(sed -n "$latency_re" "$log")
  read -r idle pred_latency < <(sed -n "$latency_re" "$idle_log")
  [[ -n "$base" ]] || base=$measured
  awk -v k="$k" -v m="$measured" -v p="$predicted" -v b="$base" -v l="$p50" -v il="$idle" -v pl="$pred_latency" \
    'BEGIN { printf "%-7s %12.1f %12.1f %9.2f %8.2fx %8.2fx %10.1f %10.1f %10.1f\n", k, m, p, m / p, m / b, 0.85 * k, l, il, pl }'
done
echo "(speed-up is over the first row; p50 ms: a micro-batch's latency in the full stream, queueing"
echo " included; idle ms: one micro-batch at a time, what the planner predicts (pred. ms);"
echo " the plans and accuracies are in $out/logs/infer-*.log)"
