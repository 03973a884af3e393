#!/usr/bin/env bash
# Everything needed to run the whole test suite on a fresh Debian 12 machine:
# install packages (as root), fetch MNIST-10k, build, fuzz every decoder for a bounded time
# (clang + libFuzzer, ASan + UBSan), and run every test with CTest.
# FEDSLICE_FUZZ_SECONDS (default 20 per target; 0 skips fuzzing) bounds the fuzzing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
FEDSLICE_SETUP_EXTRA=1 bash scripts/setup.sh
bash scripts/fetch_mnist.sh
bash scripts/build.sh
fuzz_seconds=${FEDSLICE_FUZZ_SECONDS:-20}
if [[ "$fuzz_seconds" != 0 ]]; then
  bash scripts/fuzz.sh "$fuzz_seconds"
fi
build_dir=${FEDSLICE_BUILD_DIR:-$root/build}
cd "$build_dir"
# Unit tests run two at a time; integration tests (training, multi-process) are RUN_SERIAL.
ctest --output-on-failure -j "$(nproc)" "$@"
