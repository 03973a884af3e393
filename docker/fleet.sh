#!/usr/bin/env bash
# fleet.sh: a simulated edge fleet in Docker, end to end.
#
#   docker/fleet.sh [run] [options]     the whole story, then tear down (default)
#   docker/fleet.sh up [options]        the same, but leave the fleet running
#   docker/fleet.sh infer [options] [-- FLAGS]   split inference against a running fleet
#                                       (--name, --out, --stages, --micro-batch, --activations,
#                                       --limit; FLAGS go to fedslice infer as they are)
#   docker/fleet.sh down [--name NAME]  save the logs of a fleet left running, remove it
#
# The story: make sure a Docker engine runs (docker/engine.sh), build the base image when no
# registry can provide it (docker/make_base_image.sh) and the FedSlice image (docker/
# build_image.sh, skipped when up to date), make development certificates, create a network
# of the fleet's own, start one coordinator and N client containers (each with its own data
# partition, its own certificate, the CPU and memory limits of an edge device and optional
# traffic shaping), train R rounds over mutual TLS, check the accuracy in the coordinator's
# metrics, run split inference of the trained model over K client containers (`fedslice
# infer` in a requester container), check that every request was answered exactly once and
# the accuracy, print a summary. Every container and the network are removed on exit, also
# on failure or Ctrl-C, unless the fleet is meant to stay ('up', --keep).
#
# Options:
#   --clients N         client containers (default 4)
#   --rounds R          federated rounds (default 3; 0 serves --init-model without training)
#   --model M           mlp | cnn (default mlp)
#   --init-model FILE   start from this model file (fedslice train --out) instead of a seeded one
#   --partition P       iid | shards[:K] | dirichlet[:ALPHA] (default iid)
#   --cpus C            CPU limit of each client container (default 1)
#   --memory M          memory limit of each client container (default 512m)
#   --shape I=SPEC      shape client I's traffic, repeatable; SPEC is 'rate:20mbit' (tc tbf:
#                       bandwidth) or 'netem:delay 40ms rate 20mbit' (tc netem: latency,
#                       jitter, loss, rate; needs the kernel's sch_netem)
#   --stages K          split-inference stages (default 3; 0 skips split inference)
#   --micro-batch B     split-inference micro-batch (default 64)
#   --activations A     activations between stages: fp32 | fp16 | int8 (default fp32)
#   --limit N           classify only the first N test images (default: all 2,000)
#   --min-accuracy A    fail below this test accuracy, after training and of the split
#                       inference (default 0.85)
#   --name NAME         fleet name: prefix of its containers and network (default
#                       fedslice-fleet); fleets with different names can run side by side
#   --out DIR           certificates, metrics, logs and summary (default out/docker-fleet)
#   --image IMAGE       FedSlice image (default fedslice:latest)
#   --jobs N            compile jobs for the image build (default: cores)
#   --no-build          use --image as it is (pulled, or built before); fail if it is missing
#   --timeout S         bound on training and on inference, each (default 900 s)
#   --keep              leave the fleet running at the end (remove it with 'down')
#   --ci                CI mode: no engine -> print SKIPPED with the reason, exit 77
#
# Output: OUT/summary.txt; OUT/coordinator/metrics.{csv,jsonl} (one row per round),
# global.pb, checkpoints/; OUT/infer.txt; OUT/logs/<container>.log (saved at tear-down).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { echo "fleet: $*"; }
die() { echo "fleet: error: $*" >&2; exit 1; }
usage() { sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

command=run
case "${1:-}" in
  run|up|infer|down) command=$1; shift ;;
esac

clients=4
rounds=3
model=mlp
init_model=""
partition=iid
cpus=1
memory=512m
stages=3
micro_batch=64
activations=fp32
limit=0
min_accuracy=0.85
name=fedslice-fleet
out=""
image=fedslice:latest
jobs=$(nproc)
build=1
timeout_s=900
keep=0
ci=0
declare -A shape=()
infer_extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; infer_extra=("$@"); break ;;
    --keep) keep=1; shift; continue ;;
    --ci) ci=1; shift; continue ;;
    --no-build) build=0; shift; continue ;;
    -h|--help) sed -n '2,50s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  esac
  case "$1" in
    --clients|--rounds|--model|--init-model|--partition|--cpus|--memory|--shape|--stages|\
    --micro-batch|--activations|--limit|--min-accuracy|--name|--out|--image|--jobs|--timeout)
      [[ $# -ge 2 ]] || { echo "fleet: $1 needs a value" >&2; usage; } ;;
    *) echo "fleet: unknown option $1" >&2; usage ;;
  esac
  case "$1" in
    --clients) clients=$2 ;;
    --rounds) rounds=$2 ;;
    --model) model=$2 ;;
    --init-model) init_model=$2 ;;
    --partition) partition=$2 ;;
    --cpus) cpus=$2 ;;
    --memory) memory=$2 ;;
    --shape)
      [[ "$2" =~ ^([0-9]+)=(rate|netem):(.+)$ ]] ||
        die "--shape wants I=rate:RATE or I=netem:ARGS, got '$2'"
      shape[${BASH_REMATCH[1]}]="${BASH_REMATCH[2]}:${BASH_REMATCH[3]}" ;;
    --stages) stages=$2 ;;
    --micro-batch) micro_batch=$2 ;;
    --activations) activations=$2 ;;
    --limit) limit=$2 ;;
    --min-accuracy) min_accuracy=$2 ;;
    --name) name=$2 ;;
    --out) out=$2 ;;
    --image) image=$2 ;;
    --jobs) jobs=$2 ;;
    --timeout) timeout_s=$2 ;;
    *) echo "fleet: unknown option $1" >&2; usage ;;
  esac
  shift 2
done
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
natural() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }
positive --clients "$clients"
natural --rounds "$rounds"
positive --timeout "$timeout_s"
positive --micro-batch "$micro_batch"
positive --jobs "$jobs"
natural --stages "$stages"
natural --limit "$limit"
(( stages <= clients )) || die "--stages $stages needs at least as many clients (--clients $clients)"
[[ "$model" == mlp || "$model" == cnn ]] || die "--model must be mlp or cnn, got '$model'"
[[ "$activations" == fp32 || "$activations" == fp16 || "$activations" == int8 ]] ||
  die "--activations must be fp32, fp16 or int8, got '$activations'"
{ [[ "$cpus" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v c="$cpus" 'BEGIN { exit !(c > 0) }'; } ||
  die "--cpus must be a positive number, got '$cpus'"
[[ "$memory" =~ ^[1-9][0-9]*[kmgKMG]?$ ]] || die "--memory must look like 512m or 2g, got '$memory'"
[[ "$min_accuracy" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || die "--min-accuracy must be in [0, 1]"
[[ "$name" =~ ^[a-z0-9][a-z0-9_.-]*$ ]] || die "--name must be lower-case [a-z0-9_.-], got '$name'"
for i in "${!shape[@]}"; do
  (( i < clients )) || die "--shape $i=...: there is no client $i (--clients $clients)"
done
if [[ -n "$init_model" ]]; then
  [[ -f "$init_model" ]] || die "--init-model $init_model: no such file"
  init_model=$(cd "$(dirname "$init_model")" && pwd)/$(basename "$init_model")
fi
(( rounds > 0 )) || [[ -n "$init_model" ]] || die "--rounds 0 needs --init-model FILE to serve"
[[ $command != up ]] || keep=1
out=${out:-$root/out/docker-fleet}
mkdir -p "$out"
out=$(cd "$out" && pwd)
label="org.fedslice.fleet=$name"
network="$name-net"
coordinator_port=7400
stage_port=7500

# Everything a fleet creates carries its label: removal is by label, so a fleet killed hard
# is cleaned up by the next run (or 'down') of the same name, and nothing else is touched.
remove_fleet() {
  local ids
  ids=$(docker ps -aq --filter "label=$label" 2>/dev/null || true)
  # shellcheck disable=SC2086  # a list of ids
  [[ -z "$ids" ]] || docker rm -f $ids >/dev/null 2>&1 || true
  ids=$(docker network ls -q --filter "label=$label" 2>/dev/null || true)
  # shellcheck disable=SC2086
  [[ -z "$ids" ]] || docker network rm $ids >/dev/null 2>&1 || true
}

# Containers run as the image's unprivileged user; as root we hand it the files it must read
# (its key) or write (the coordinator's output). As another user, containers run with that
# user's uid, which owns the files already.
user_args=()
run_ids() {
  if [[ $(id -u) -eq 0 ]]; then
    run_uid=$(docker run --rm --entrypoint id "$image" -u)
    run_gid=$(docker run --rm --entrypoint id "$image" -g)
  else
    run_uid=$(id -u)
    run_gid=$(id -g)
    user_args=(--user "$run_uid:$run_gid")
  fi
}

# Containers find each other through /etc/hosts entries (--add-host) on fixed addresses of
# the fleet's subnet, not through the engine's embedded DNS: that one needs iptables, and an
# engine started with --iptables=false (docker/engine.sh's fallback) has none.
ip2int() { local IFS=.; read -r a b c d <<<"$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }
int2ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
host_args=()
requester_ip=()
# hosts_of_running_fleet: host_args for the containers of a running fleet.
hosts_of_running_fleet() {
  local line
  host_args=()
  while read -r line; do
    [[ -n "$line" ]] && host_args+=(--add-host "${line% *}:${line#* }")
  done < <(docker ps --filter "label=$label" -q | xargs -r docker inspect \
             -f "{{.Config.Hostname}} {{with index .NetworkSettings.Networks \"$network\"}}{{.IPAddress}}{{end}}")
  for line in "${host_args[@]}"; do
    [[ "$line" == coordinator:* ]] && host_args+=(--add-host "fedslice-$line")
  done
  return 0
}

# run_infer CONTAINER OUTFILE: `fedslice infer` in a requester container on the fleet's
# network; prints its report and returns its exit status (non-zero unless every image was
# answered exactly once).
run_infer() {
  local container=$1 file=$2 rc
  set +e
  timeout "$timeout_s" docker run --network "$network" --label "$label" "${user_args[@]}" \
    "${host_args[@]}" "${requester_ip[@]}" \
    --volume "$root/data/mnist-10k:/data:ro" --volume "$out/mounts/requester:/certs:ro" \
    --name "$container" "$image" fedslice infer --coordinator "coordinator:$coordinator_port" \
    --ca /certs/ca.pem --cert /certs/cert.pem --key /certs/key.pem --data /data \
    --limit "$limit" --stages "$stages" --micro-batch "$micro_batch" \
    --activations "$activations" "${infer_extra[@]}" >"$file" 2>&1
  rc=$?
  set -e
  cat "$file"
  return "$rc"
}

# check_infer FILE: every request answered exactly once, over distinct clients, accuracy.
check_infer() {
  local file=$1 answered used accuracy
  answered=$(sed -n 's/^answered \([0-9]*\)\/\([0-9]*\) exactly once$/\1 \2/p' "$file")
  [[ -n "$answered" && "${answered% *}" == "${answered#* }" ]] ||
    die "split inference did not answer every request exactly once (see $file)"
  # The first plan's stage lines: "  stage 0: client-2   client-2:7500 ...".
  used=$(awk '/^plan /{ p = 1; next } p && /^  stage [0-9]+:/ { print $3; next } p { exit }' \
           "$file" | sort -u | wc -l)
  (( used == stages )) || die "the pipeline used $used distinct clients, not $stages (see $file)"
  accuracy=$(sed -n 's/^accuracy: \([0-9.]*\)% .*/\1/p' "$file")
  [[ -n "$accuracy" ]] || die "no accuracy in $file"
  awk -v a="$accuracy" -v m="$min_accuracy" 'BEGIN { exit !(a / 100 >= m) }' ||
    die "split-inference accuracy $accuracy% is below --min-accuracy $min_accuracy"
  infer_accuracy=$accuracy
  infer_answered=${answered% *}
}

if [[ $command == down ]]; then
  docker info >/dev/null 2>&1 || die "no Docker engine answers"
  mkdir -p "$out/logs"
  for c in $(docker ps -a --filter "label=$label" --format '{{.Names}}'); do
    docker logs "$c" >"$out/logs/${c#"$name"-}.log" 2>&1 || true
  done
  remove_fleet
  say "removed fleet $name (its logs: $out/logs)"
  exit 0
fi

if [[ $command == infer ]]; then
  docker info >/dev/null 2>&1 || die "no Docker engine answers"
  docker inspect "$name-coordinator" >/dev/null 2>&1 ||
    die "no fleet '$name' is running (start one with: docker/fleet.sh up --name $name)"
  (( stages > 0 )) || die "--stages must be at least 1"
  [[ -d "$out/mounts/requester" ]] || die "no requester certificate in $out (wrong --out?)"
  run_ids
  hosts_of_running_fleet
  file="$out/infer-$(date +%Y%m%d-%H%M%S)-$stages.txt"
  container="$name-requester-$$"
  trap 'docker rm -f "$container" >/dev/null 2>&1 || true' EXIT
  run_infer "$container" "$file" || die "fedslice infer failed (report: $file)"
  check_infer "$file"
  say "answered $infer_answered images exactly once over $stages stages; accuracy $infer_accuracy%"
  exit 0
fi

t0=$SECONDS
declare -A took=()
phase_start=$SECONDS
phase() { took[$1]=$((SECONDS - phase_start)); phase_start=$SECONDS; }

# ---- 1. engine ------------------------------------------------------------------------------
set +e
engine_out=$(bash "$root/docker/engine.sh" 2>&1)
engine_rc=$?
set -e
[[ -z "$engine_out" ]] || echo "$engine_out"
if [[ $engine_rc -ne 0 ]]; then
  reason=$(tail -n 1 <<<"$engine_out")
  if [[ $engine_rc -eq 77 ]]; then
    echo "SKIPPED: ${reason#engine: }"
    [[ $ci == 1 ]] && exit 77
    exit 1
  fi
  die "docker/engine.sh failed ($engine_rc)"
fi
phase engine

# ---- 2. images ------------------------------------------------------------------------------
built_base=""
if [[ $build == 1 ]]; then
  docker image inspect debian:bookworm-slim >/dev/null 2>&1 || built_base=" (with the base image)"
  bash "$root/docker/build_image.sh" --image "$image" --jobs "$jobs"
else
  docker image inspect "$image" >/dev/null 2>&1 || die "--no-build: there is no image $image"
fi
phase images
has_infer=0
docker run --rm "$image" fedslice infer --help >/dev/null 2>&1 && has_infer=1

# ---- 3. data and certificates ---------------------------------------------------------------
bash "$root/scripts/fetch_mnist.sh" >/dev/null
data="$root/data/mnist-10k"
names=()
for ((i = 0; i < clients; i++)); do names+=("client-$i"); done
names_csv=$(IFS=,; echo "${names[*]},requester")
bash "$root/scripts/make_certs.sh" "$out/certs" --names "$names_csv" >/dev/null
run_ids
stage_certs() {  # stage_certs NAME: OUT/mounts/NAME/{ca.pem,cert.pem,key.pem}, no CA key
  local dir="$out/mounts/$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$out/certs/ca.pem" "$dir/ca.pem"
  cp "$out/certs/$1.pem" "$dir/cert.pem"
  cp "$out/certs/$1.key" "$dir/key.pem"
  chmod 0644 "$dir/ca.pem" "$dir/cert.pem"
  chmod 0600 "$dir/key.pem"
  [[ $(id -u) -ne 0 ]] || chown -R "$run_uid:$run_gid" "$dir"
}
rm -rf "$out/mounts"
for n in coordinator "${names[@]}" requester; do stage_certs "$n"; done
rm -rf "$out/coordinator" "$out/logs" "$out/infer.txt" "$out/summary.txt"
mkdir -p "$out/coordinator" "$out/logs"
[[ $(id -u) -ne 0 ]] || chown "$run_uid:$run_gid" "$out/coordinator"
phase certs

# ---- 4. network, coordinator, clients -------------------------------------------------------
containers=()
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if docker info >/dev/null 2>&1; then
    for c in "${containers[@]}"; do
      docker logs "$c" >"$out/logs/${c#"$name"-}.log" 2>&1 || true
    done
    if [[ $keep == 1 && $rc == 0 ]]; then
      say "fleet $name is running: docker/fleet.sh infer --name $name --out $out;" \
          "docker/fleet.sh down --name $name removes it"
    else
      remove_fleet
      [[ ${#containers[@]} -eq 0 ]] || say "removed the fleet's containers and network"
    fi
  fi
  [[ $rc == 0 ]] || echo "fleet: FAILED (exit $rc); logs in $out/logs" >&2
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

remove_fleet
# --internal: the fleet's containers reach each other and nothing else. The engine picks a
# free subnet; the network is made again with that subnet given, which fixed addresses need.
docker network create --internal --label "$label" "$network" >/dev/null
subnet=$(docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$network")
docker network rm "$network" >/dev/null
[[ "$subnet" =~ ^([0-9.]+)/([0-9]+)$ ]] || die "unexpected subnet '$subnet' of $network"
(( (1 << (32 - BASH_REMATCH[2])) > clients + 32 )) || die "subnet $subnet is too small"
docker network create --internal --subnet "$subnet" --label "$label" "$network" >/dev/null
first=$(ip2int "${BASH_REMATCH[1]}")
coordinator_ip=$(int2ip $((first + 10)))
requester_ip=(--ip "$(int2ip $((first + 11)))")
host_args=(--add-host "coordinator:$coordinator_ip" --add-host "fedslice-coordinator:$coordinator_ip")
for ((i = 0; i < clients; i++)); do host_args+=(--add-host "client-$i:$(int2ip $((first + 32 + i)))"); done

coordinator_args=(--model "$model" --rounds "$rounds" --fraction 1 --min-fit "$clients"
                  --epochs 1 --batch 10 --lr 0.05)
model_mount=()
if [[ -n "$init_model" ]]; then
  model_mount=(--volume "$init_model:/model/init.pb:ro")
  coordinator_args+=(--init-model /model/init.pb)
fi
client_stage_args=()
if [[ $has_infer == 1 ]]; then
  # After training the coordinator stays up to plan pipelines and assign slices; each client
  # hosts stages on a port of its own container, reached by its name (its certificate's).
  coordinator_args+=(--serve)
elif (( stages > 0 )); then
  say "this image has no 'fedslice infer': split inference is skipped"
fi
common_run=(--detach --network "$network" --label "$label" "${user_args[@]}" "${host_args[@]}"
            --volume "$data:/data:ro")
containers+=("$name-coordinator")
docker run "${common_run[@]}" "${model_mount[@]}" --name "$name-coordinator" \
  --hostname coordinator --ip "$coordinator_ip" \
  --volume "$out/mounts/coordinator:/certs:ro" --volume "$out/coordinator:/out" \
  "$image" fedslice-coordinator --ca /certs/ca.pem --cert /certs/cert.pem --key /certs/key.pem \
  --bind 0.0.0.0 --port "$coordinator_port" --data /data --min-available "$clients" \
  --round-deadline-ms 300000 --out-dir /out --save-model /out/global.pb \
  "${coordinator_args[@]}" >/dev/null

# A device's budget is its container's limit, not the host's MemAvailable that /proc shows.
mem_bytes=$(numfmt --from=iec "${memory^^}")
budget_mb=$((mem_bytes * 3 / 4 / 1024 / 1024))
threads=$(awk -v c="$cpus" 'BEGIN { t = int(c); if (t < c) t++; if (t < 1) t = 1; print t }')
profiles() { docker logs "$name-coordinator" 2>&1 | grep -c "updated its device profile" || true; }
for ((i = 0; i < clients; i++)); do
  c="$name-client-$i"
  extra=()
  shaped=""
  if [[ -n "${shape[$i]:-}" ]]; then
    kind=${shape[$i]%%:*}
    spec=${shape[$i]#*:}
    # Shaping needs root with NET_ADMIN for tc; the entry point drops both before the client.
    extra=(--user 0 --cap-add NET_ADMIN -e "FEDSLICE_RUN_AS=$run_uid:$run_gid")
    if [[ $kind == rate ]]; then extra+=(-e "FEDSLICE_RATE=$spec"); else extra+=(-e "FEDSLICE_NETEM=$spec"); fi
    shaped=", shaped $kind $spec"
  fi
  [[ $has_infer == 0 ]] ||
    client_stage_args=(--stage-port "$stage_port" --stage-bind 0.0.0.0 --stage-advertise "client-$i")
  containers+=("$c")
  docker run "${common_run[@]}" "${extra[@]}" --name "$c" --hostname "client-$i" \
    --ip "$(int2ip $((first + 32 + i)))" --cpus "$cpus" --memory "$memory" --memory-swap "$memory" \
    --volume "$out/mounts/client-$i:/certs:ro" \
    "$image" fedslice-client --coordinator "coordinator:$coordinator_port" \
    --ca /certs/ca.pem --cert /certs/cert.pem --key /certs/key.pem \
    --data /data --partition "$partition" --partition-seed 1 --index "$i" --count "$clients" \
    --threads "$threads" --memory-budget-mb "$budget_mb" --device-name "$c" \
    "${client_stage_args[@]}" >/dev/null
  say "started $c (cpus $cpus, memory $memory$shaped)"
  if [[ $has_infer == 1 ]]; then
    # One at a time: a client times the model's layers on its own device limits when it
    # registers (its profile for the planner), best measured while the others are idle.
    for _ in $(seq 120); do
      (( $(profiles) > i )) && break
      [[ $(docker inspect -f '{{.State.Running}}' "$c" 2>/dev/null) == true ]] || break
      sleep 0.5
    done
    if (( $(profiles) <= i )); then
      docker logs --tail 20 "$c" >&2 || true
      die "$c did not register its device profile with the coordinator"
    fi
  fi
done
phase up

# ---- 5. training ----------------------------------------------------------------------------
metrics="$out/coordinator/metrics.csv"
rows() { if [[ -s "$metrics" ]]; then echo $(($(wc -l <"$metrics") - 1)); else echo 0; fi; }
state() { docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$1" 2>/dev/null || echo "gone 1"; }
accuracy="n/a (no training: serving $init_model)"
if (( rounds > 0 )); then
  say "training $rounds rounds of $model on $clients clients"
  deadline=$((SECONDS + timeout_s))
  while true; do
    done_rounds=$(rows)
    (( ${done_rounds:-0} < rounds )) || break
    read -r status code < <(state "$name-coordinator")
    if [[ $status != running ]]; then
      done_rounds=$(rows)
      (( ${done_rounds:-0} >= rounds && code == 0 )) && break
      docker logs --tail 30 "$name-coordinator" >&2 || true
      die "the coordinator stopped ($status, exit $code) after $done_rounds of $rounds rounds"
    fi
    # A client that cannot start (bad certificate, shaping refused) would leave the coordinator
    # waiting for --min-available forever: fail at once with its log.
    failed=$(docker ps -a --filter "label=$label" --filter status=exited \
               --format '{{.Names}} {{.Status}}' | grep -v 'Exited (0)' | head -n1 || true)
    if [[ -n "$failed" ]]; then
      docker logs --tail 20 "${failed%% *}" >&2 || true
      die "container ${failed%% *} stopped during training: ${failed#* }"
    fi
    (( SECONDS < deadline )) || die "training did not finish within $timeout_s s ($done_rounds rounds)"
    sleep 1
  done
  if [[ $has_infer == 0 ]]; then
    # Without serving, the coordinator exits after the last round (and saves the model).
    timeout 120 docker wait "$name-coordinator" >/dev/null || die "the coordinator did not exit"
    read -r status code < <(state "$name-coordinator")
    [[ $code == 0 ]] || die "the coordinator exited with $code"
  fi
  accuracy=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "accuracy") col = i; next }
                      { a = $col } END { print a }' "$metrics")
  [[ -n "$accuracy" ]] || die "no accuracy in $metrics"
  awk -v a="$accuracy" -v m="$min_accuracy" 'BEGIN { exit !(a >= m) }' ||
    die "accuracy after $rounds rounds is $accuracy, below --min-accuracy $min_accuracy"
  answered=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "clients_answered") ca = i; if ($i == "clients_asked") cq = i }; next }
                      { a += $ca; q += $cq } END { printf "%d/%d", a, q }' "$metrics")
  say "trained: accuracy $accuracy after $rounds rounds ($answered fit tasks answered)"
fi
phase training

# ---- 6. split inference ---------------------------------------------------------------------
infer_summary="skipped (--stages 0)"
if (( stages > 0 )) && [[ $has_infer == 0 ]]; then
  infer_summary="skipped: this image has no 'fedslice infer'"
elif (( stages > 0 )); then
  say "split inference of the trained model over $stages client containers"
  containers+=("$name-requester")
  run_infer "$name-requester" "$out/infer.txt" ||
    die "fedslice infer failed: not every request was answered exactly once (see $out/infer.txt)"
  check_infer "$out/infer.txt"
  if (( rounds > 0 && limit == 0 )) && [[ $activations == fp32 ]]; then
    # The pipeline computes the very model the coordinator evaluated, on the same test split:
    # the accuracies agree up to float rounding (allow 2 of 2,000 images).
    awk -v a="$infer_accuracy" -v t="$accuracy" 'BEGIN { d = a - 100 * t; exit !(d <= 0.1 && d >= -0.1) }' ||
      die "split-inference accuracy $infer_accuracy% differs from the coordinator's $accuracy"
  fi
  infer_summary="$infer_answered images answered exactly once, accuracy $infer_accuracy%, $(
    sed -n 's/^throughput: \([0-9.]*\) images\/s.*/\1 images\/s/p' "$out/infer.txt")"
  phase inference
fi

# ---- 7. summary -----------------------------------------------------------------------------
{
  echo "== FedSlice Docker fleet '$name': coordinator + $clients clients ($model, $partition)"
  printf '   client limits: cpus %s, memory %s' "$cpus" "$memory"
  for i in "${!shape[@]}"; do printf '; client-%s shaped %s' "$i" "${shape[$i]}"; done
  echo
  if (( rounds > 0 )); then
    echo "== rounds ($metrics)"
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i
                       printf "   %-6s %-9s %-8s %-9s %-12s %s\n", "round", "accuracy", "loss", "answered", "bytes_up", "seconds"; next }
             { printf "   %-6s %-9s %-8.4f %-9s %-12s %.2f\n", $c["round"], $c["accuracy"], $c["loss"],
                      $c["clients_answered"] "/" $c["clients_asked"], $c["bytes_up"], $c["seconds"] }' "$metrics"
  fi
  echo "== final accuracy: $accuracy (required >= $min_accuracy)"
  echo "== split inference: $infer_summary"
  if [[ -s "$out/infer.txt" ]]; then
    awk '/^plan /{ p = 1; next } p && /^  stage [0-9]+:/ { print "   " $0; next } p { exit }' \
      "$out/infer.txt"
  fi
  printf '== times: engine %ss, images %ss%s, certificates %ss, start %ss, training %ss%s; total %ss\n' \
    "${took[engine]}" "${took[images]}" "$built_base" "${took[certs]}" "${took[up]}" \
    "${took[training]}" "${took[inference]:+, split inference ${took[inference]}s}" \
    "$((SECONDS - t0))"
  echo "== output: $out (metrics in coordinator/, container logs in logs/ after tear-down)"
} | tee "$out/summary.txt"
exit 0
