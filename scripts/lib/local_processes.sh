# shellcheck shell=bash
# Sourced by the scripts that run a coordinator and clients as local processes
# (examples/local_federation.sh, examples/split_inference.sh, bench/pipeline_bench.sh):
# what each of them did the same way.
#
#   require_executables BIN...           exit 1 naming the first one missing
#   start_background LOG CMD ARGS...     run CMD in the background, output to LOG; its pid is
#                                        appended to `pids`, which are killed when the script
#                                        exits (also on failure or Ctrl-C)
#   wait_for_port PORT_FILE LOG          print the port the coordinator wrote (~10 s), or exit 1
#                                        with its log
#   wait_for_profiles N COORD_LOG LOG    wait (~60 s) until the coordinator has N device
#                                        profiles, or exit 1 with the client's log LOG

pids=()
cleanup_local_processes() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup_local_processes EXIT INT TERM

require_executables() {
  local bin
  for bin in "$@"; do
    [[ -x "$bin" ]] || { echo "missing $bin: run scripts/build.sh first" >&2; exit 1; }
  done
}

start_background() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  pids+=("$!")
}

wait_for_port() {
  local port_file=$1 log=$2
  for _ in $(seq 100); do [[ -s "$port_file" ]] && break; sleep 0.1; done
  [[ -s "$port_file" ]] || { echo "coordinator did not start:" >&2; cat "$log" >&2; exit 1; }
  cat "$port_file"
}

wait_for_profiles() {
  local want=$1 coordinator_log=$2 client_log=$3 n=0
  for _ in $(seq 300); do
    n=$(grep -c "updated its device profile" "$coordinator_log" || true)
    (( n >= want )) && return 0
    sleep 0.2
  done
  echo "a client did not report its device profile ($n of $want); $client_log:" >&2
  tail -20 "$client_log" >&2
  exit 1
}
