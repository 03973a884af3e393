#!/usr/bin/env bash
# Configures and builds FedSlice into build/ (or $FEDSLICE_BUILD_DIR).
# Extra arguments go to the CMake configure step, e.g. -DFEDSLICE_ARCH=x86-64-v3.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${FEDSLICE_BUILD_DIR:-$root/build}
generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$build_dir/Makefile" ]]; then
  generator=(-G Ninja)
fi
cmake -S "$root" -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
