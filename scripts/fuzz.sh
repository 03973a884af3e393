#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/*_fuzz.cc) with clang, ASan and UBSan in build-fuzz/
# and runs each for a bounded time; fails if any of them finds a crash, a leak, undefined
# behaviour or a violated property. Crash inputs are kept in build-fuzz/artifacts/ and the
# corpora grow across runs in build-fuzz/corpus/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 20)
#
# Needs clang and libclang-rt-14-dev (scripts/setup.sh with FEDSLICE_SETUP_EXTRA=1).
set -euo pipefail

seconds="${1:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${FEDSLICE_FUZZ_BUILD_DIR:-$root/build-fuzz}"
jobs="${FEDSLICE_JOBS:-$(nproc)}"

if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz: clang++ not found; install clang and libclang-rt-14-dev" >&2
  exit 1
fi

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFEDSLICE_BUILD_FUZZ=ON -DFEDSLICE_SANITIZE=address \
  -DFEDSLICE_BUILD_TESTS=OFF -DFEDSLICE_BUILD_BENCH=OFF >/dev/null

targets=()
for src in "$root"/tests/fuzz/*_fuzz.cc; do
  targets+=("$(basename "$src" .cc)")
done
cmake --build "$build" -j"$jobs" --target "${targets[@]}"

mkdir -p "$build/artifacts"
failed=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  mkdir -p "$corpus"
  echo "fuzz: running $t for ${seconds}s"
  if ! "$build/tests/fuzz/$t" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 \
      -timeout=10 -print_final_stats=1 -artifact_prefix="$build/artifacts/$t-" \
      >"$build/$t.log" 2>&1; then
    echo "fuzz: $t FAILED; last lines of $build/$t.log:" >&2
    tail -n 30 "$build/$t.log" >&2
    failed+=("$t")
  else
    grep -E "stat::number_of_executed_units|cov:" "$build/$t.log" | tail -n 2 | sed "s/^/fuzz: $t: /"
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: failures in ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s without a finding"
