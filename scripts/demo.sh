#!/usr/bin/env bash
# FedSlice's main job on a fresh Debian 12 machine: install packages (as root), fetch
# MNIST-10k, build, and train the CNN centrally, printing its test accuracy per epoch.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
bash scripts/fetch_mnist.sh
bash scripts/build.sh
build_dir=${FEDSLICE_BUILD_DIR:-$root/build}
mkdir -p out
echo "== centralised training: cnn on MNIST-10k"
"$build_dir/tools/fedslice" train --model cnn --data data/mnist-10k \
  --epochs "${FEDSLICE_DEMO_EPOCHS:-3}" --batch 32 --lr 0.05 --momentum 0.9 --out out/cnn.pb
"$build_dir/tools/fedslice" eval --model-file out/cnn.pb --data data/mnist-10k
