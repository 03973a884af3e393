#!/usr/bin/env bash
# Everything needed to run the whole test suite on a fresh Debian 12 machine:
# install packages (as root), fetch MNIST-10k, build, and run every test with CTest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
bash scripts/fetch_mnist.sh
bash scripts/build.sh
build_dir=${FEDSLICE_BUILD_DIR:-$root/build}
cd "$build_dir"
# Unit tests run two at a time; integration tests (training, multi-process) are RUN_SERIAL.
ctest --output-on-failure -j "$(nproc)" "$@"
