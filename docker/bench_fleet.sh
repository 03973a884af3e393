#!/usr/bin/env bash
# bench_fleet.sh: split-inference throughput of a pipeline of client containers, each limited
# to a fraction of a CPU by Docker (real CFS limits, not emulation), against one such
# container alone.
#
#   docker/bench_fleet.sh [--cpus 0.5] [--stages "1 3"] [--repeat 3] [--limit 2000]
#                         [--micro-batch 64] [--activations fp32] [--no-build] [-- FLAGS]
#
# Trains a cnn for one epoch once (in a container; the weights do not change the speed) and
# starts a fleet of max(stages) clients serving it (docker/fleet.sh up --rounds 0), each with
# --cpus C. Then runs `fedslice infer` --repeat times per stage count and prints the median
# images/s, the planner's prediction, the speed-up over the first stage count and the latency
# per micro-batch. The requester and the coordinator run without limits. The fleet is removed
# at the end, also on failure or Ctrl-C. FLAGS go to every `fedslice infer` as they are (e.g.
# -- --no-split-layers). Output: out/docker-bench/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "bench_fleet: error: $*" >&2; exit 1; }

cpus=0.5
stages_list="1 3"
repeat=3
limit=2000
micro_batch=64
activations=fp32
build_args=()
infer_extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; infer_extra=("$@"); break ;;
    --no-build) build_args=(--no-build); shift; continue ;;
    -h|--help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --cpus) cpus=$2 ;;
    --stages) stages_list=$2 ;;
    --repeat) repeat=$2 ;;
    --limit) limit=$2 ;;
    --micro-batch) micro_batch=$2 ;;
    --activations) activations=$2 ;;
    *) die "unknown option $1" ;;
  esac
  shift 2
done
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer"
max_stages=0
for k in $stages_list; do
  [[ "$k" =~ ^[1-9][0-9]*$ ]] || die "--stages wants positive integers, got '$k'"
  (( k > max_stages )) && max_stages=$k
done

out=$root/out/docker-bench
name=fedslice-bench
mkdir -p "$out"
fleet=(bash "$root/docker/fleet.sh")

bash "$root/docker/engine.sh" || die "no Docker engine"
if [[ ${#build_args[@]} -eq 0 ]]; then
  bash "$root/docker/build_image.sh"
fi
bash "$root/scripts/fetch_mnist.sh" >/dev/null

if [[ ! -s "$out/cnn.pb" ]]; then
  echo "bench_fleet: training a cnn for one epoch (in a container)"
  mkdir -p "$out/model"
  [[ $(id -u) -ne 0 ]] || chown "$(docker run --rm --entrypoint id fedslice:latest -u)" "$out/model"
  user=()
  [[ $(id -u) -eq 0 ]] || user=(--user "$(id -u):$(id -g)")
  docker run --rm --network none "${user[@]}" -v "$root/data/mnist-10k:/data:ro" \
    -v "$out/model:/out" fedslice:latest fedslice train --model cnn --data /data --epochs 1 \
    --batch 32 --lr 0.01 --momentum 0.9 --out /out/cnn.pb >"$out/train.log" 2>&1 ||
    { tail "$out/train.log" >&2; die "training the cnn failed"; }
  cp "$out/model/cnn.pb" "$out/cnn.pb"
fi

trap '"${fleet[@]}" down --name "$name" >/dev/null 2>&1 || true' EXIT
"${fleet[@]}" up --no-build --name "$name" --out "$out/fleet" --clients "$max_stages" \
  --cpus "$cpus" --model cnn --rounds 0 --init-model "$out/cnn.pb" --stages 0 >"$out/up.log" 2>&1 ||
  { tail -n 30 "$out/up.log" >&2; die "the fleet did not start"; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "cnn, $limit MNIST-10k test images, micro-batch $micro_batch, $activations activations" \
     "${infer_extra[*]};" \
     "each stage a container with --cpus $cpus ($(nproc)-core host); median of $repeat runs"
printf "%-7s %10s %10s %9s %10s %10s\n" stages "images/s" predicted speed-up "p50 ms" accuracy
base=""
for k in $stages_list; do
  : >"$out/runs-$k.txt"
  : >"$out/p50-$k.txt"
  for ((r = 1; r <= repeat; r++)); do
    log="$out/infer-$k-$r.txt"
    "${fleet[@]}" infer --name "$name" --out "$out/fleet" --stages "$k" --limit "$limit" \
      --micro-batch "$micro_batch" --activations "$activations" -- "${infer_extra[@]}" \
      >"$log" 2>&1 ||
      { tail -n 30 "$log" >&2; die "fedslice infer --stages $k failed"; }
    sed -n 's/^throughput: \([0-9.]*\) images\/s (predicted \([0-9.]*\)).*/\1 \2/p' "$log" \
      >>"$out/runs-$k.txt"
    sed -n 's/^latency per micro-batch: p50 \([0-9.]*\) ms.*/\1/p' "$log" >>"$out/p50-$k.txt"
  done
  measured=$(cut -d' ' -f1 "$out/runs-$k.txt" | median)
  predicted=$(cut -d' ' -f2 "$out/runs-$k.txt" | median)
  p50=$(median <"$out/p50-$k.txt")
  rm -f "$out/p50-$k.txt"
  accuracy=$(sed -n 's/^accuracy: \([0-9.]*%\).*/\1/p' "$log")
  [[ -n "$base" ]] || base=$measured
  awk -v k="$k" -v m="$measured" -v p="$predicted" -v b="$base" -v l="$p50" -v a="$accuracy" \
    'BEGIN { printf "%-7s %10.1f %10.1f %8.2fx %10.1f %10s\n", k, m, p, m / b, l, a }'
done
echo "(each run's report, with its plan: $out/infer-<stages>-<run>.txt)"
